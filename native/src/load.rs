//! Reading checkpoints from disk: memory-maps files and hands their bytes to
//! `ipaflux-core`'s parsers. Knows the Hugging Face folder layouts (a repo
//! folder, or a cache entry `models--org--name` with `snapshots/<rev>/`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipaflux_core::candle_core::DType;
use ipaflux_core::flux::GgufWeights;
use ipaflux_core::weights::{gguf, shards_from_index_json};
use ipaflux_core::{PreprocessConfig, SiglipVisionConfig, TensorStore};

use memmap2::Mmap;

use crate::{Error, Result};

pub(crate) fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io { path: path.to_path_buf(), reason: e.to_string() }
}

/// Maps a file read-only. Empty files are returned as empty slices.
pub fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    if file.metadata().map_err(|e| io_err(path, e))?.is_dir() {
        return Err(io_err(path, "is a folder, expected a file"));
    }
    // `Mmap::map` is unsafe because another process could truncate the file
    // while it is mapped (a store keeps a safetensors file mapped until its
    // tensors are read); like every model loader, we accept that risk.
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(|e| io_err(path, e))?;
    Ok(map)
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// Resolves a Hugging Face cache entry (`models--org--name`) to its newest snapshot folder.
pub fn resolve_model_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        return Err(io_err(dir, "no such folder"));
    }
    let is_model = |d: &Path| d.join("config.json").exists() || d.join("model_index.json").exists();
    if is_model(dir) {
        return Ok(dir.to_path_buf());
    }
    let snapshots = dir.join("snapshots");
    if snapshots.is_dir() {
        let mut revs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
            .map_err(|e| io_err(&snapshots, e))?
            .filter_map(|e| e.ok())
            .filter(|e| is_model(&e.path()))
            .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path()))
            .collect();
        revs.sort();
        if let Some((_, p)) = revs.pop() {
            return Ok(p);
        }
    }
    Err(io_err(
        dir,
        "no config.json here (expected a Hugging Face model folder with config.json and model.safetensors)",
    ))
}

/// A JSON file's text and its path for messages.
pub struct JsonFile {
    pub text: String,
    pub name: String,
}

/// A Hugging Face model folder (or cache entry) resolved, with its
/// `config.json` and, when there is one, its `preprocessor_config.json`.
pub struct HfFolder {
    pub dir: PathBuf,
    pub config: JsonFile,
    pub preprocessor: Option<JsonFile>,
}

/// Reads a model folder's configs (not its weights: [`load_safetensors_in`]).
pub fn read_hf_folder(dir: &Path) -> Result<HfFolder> {
    let dir = resolve_model_dir(dir)?;
    let read =
        |p: PathBuf| -> Result<JsonFile> { Ok(JsonFile { text: read_text(&p)?, name: p.display().to_string() }) };
    let config = read(dir.join("config.json"))?;
    let pre = dir.join("preprocessor_config.json");
    let preprocessor = if pre.exists() { Some(read(pre)?) } else { None };
    Ok(HfFolder { dir, config, preprocessor })
}

/// A SigLIP folder's configs and weights (single `model.safetensors` or sharded with an index).
pub struct SiglipFiles {
    pub dir: PathBuf,
    pub config: SiglipVisionConfig,
    pub preprocess: PreprocessConfig,
    pub weights: TensorStore,
}

pub fn load_siglip_dir(dir: &Path) -> Result<SiglipFiles> {
    let HfFolder { dir, config, preprocessor } = read_hf_folder(dir)?;
    let config = SiglipVisionConfig::from_hf_json(&config.text, &config.name)?;
    let preprocess = match preprocessor {
        Some(p) => PreprocessConfig::from_hf_json(&p.text, &p.name)?,
        None => PreprocessConfig::siglip(config.image_size),
    };
    let weights = load_safetensors_in(&dir, "model")?;
    Ok(SiglipFiles { dir, config, preprocess, weights })
}

/// `<stem>.safetensors`, or the shards listed in `<stem>.safetensors.index.json`, in `dir`.
pub fn load_safetensors_in(dir: &Path, stem: &str) -> Result<TensorStore> {
    let single = dir.join(format!("{stem}.safetensors"));
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if single.exists() {
        let map = map_file(&single)?;
        Ok(TensorStore::from_safetensors_shared(Arc::new(map), &single.display().to_string())?)
    } else if index.exists() {
        let shards = shards_from_index_json(&read_text(&index)?, &index.display().to_string())?;
        let mut store = TensorStore::new(dir.display().to_string());
        for shard in shards {
            let path = dir.join(&shard);
            let map = map_file(&path)?;
            store.add_safetensors_shared(Arc::new(map), &path.display().to_string())?;
        }
        Ok(store)
    } else {
        Err(io_err(dir, format!("neither {stem}.safetensors nor {stem}.safetensors.index.json is here")))
    }
}

/// A Flux transformer's weights and, from a diffusers `config.json`, its RoPE axes.
#[derive(Clone)]
pub struct FluxFiles {
    pub weights: TensorStore,
    pub axes_dim: Option<Vec<usize>>,
}

/// The folder holding a Flux transformer: a repo's `transformer/`, or the folder itself.
pub fn flux_dir(path: &Path) -> Result<PathBuf> {
    let dir = resolve_model_dir(path)?;
    Ok(if dir.join("transformer").is_dir() { dir.join("transformer") } else { dir })
}

/// Loads Flux from a BFL single file (`flux1-dev.safetensors`, fp8 too; or a
/// GGUF file from city96's converter, `flux1-dev-Q4_K_S.gguf`, whose quantized
/// weights the model keeps or dequantizes as `GgufWeights` says), a diffusers
/// `transformer/` folder, a repo folder holding either, or a Hugging Face
/// cache entry of such a repo.
pub fn load_flux(path: &Path) -> Result<FluxFiles> {
    if path.is_file() {
        let map = map_file(path)?;
        if gguf::is_gguf(&map) {
            let arch = gguf::parse(&map).ok().and_then(|f| f.architecture().map(str::to_string));
            if let Some(arch) = arch.filter(|a| a != "flux") {
                return Err(io_err(path, format!("this GGUF file holds a `{arch}` model, not Flux")));
            }
        }
        return Ok(FluxFiles { weights: store_from_map(map, path)?, axes_dim: None });
    }
    let dir = flux_dir(path)?;
    let has = |stem: &str| {
        dir.join(format!("{stem}.safetensors")).exists() || dir.join(format!("{stem}.safetensors.index.json")).exists()
    };
    if has("diffusion_pytorch_model") {
        let cfg_path = dir.join("config.json");
        let axes_dim = if cfg_path.exists() {
            let v: serde_json::Value =
                serde_json::from_str(&read_text(&cfg_path)?).map_err(|e| io_err(&cfg_path, e))?;
            v.get("axes_dims_rope")
                .and_then(|a| a.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect())
        } else {
            None
        };
        return Ok(FluxFiles { weights: load_safetensors_in(&dir, "diffusion_pytorch_model")?, axes_dim });
    }
    // A BFL repo folder: the single file next to the README.
    let single =
        std::fs::read_dir(&dir).map_err(|e| io_err(&dir, e))?.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("flux1") && n.ends_with(".safetensors"))
        });
    match single {
        Some(p) => load_flux(&p),
        None => Err(io_err(
            &dir,
            "no Flux weights here: expected transformer/diffusion_pytorch_model*.safetensors or flux1-*.safetensors \
             (a GGUF file is given by its own path)",
        )),
    }
}

/// A Flux ControlNet: a `.safetensors` file (as in ComfyUI's
/// `models/controlnet/`) or a diffusers folder, repo or cache entry (its
/// `config.json`'s RoPE axes read), checked to be one.
pub fn load_controlnet(path: &Path) -> Result<FluxFiles> {
    let files = load_flux(path)?;
    if !ipaflux_core::flux::controlnet::is_controlnet(&files.weights) {
        return Err(io_err(
            path,
            "not a Flux ControlNet (no `controlnet_x_embedder` or `pos_embed_input`): give InstantX's, \
             Shakker-Labs' or XLabs' kind",
        ));
    }
    Ok(files)
}

/// An IP-Adapter checkpoint: the InstantX `ip-adapter.bin` (PyTorch zip) or a flat safetensors, told apart by content.
pub fn load_ip_adapter(path: &Path) -> Result<TensorStore> {
    load_store(path)
}

/// The FLUX.1 Redux image embedder's file: the file given, BFL's
/// `flux1-redux-dev.safetensors` in a repo folder, or diffusers'
/// `image_embedder/diffusion_pytorch_model.safetensors` (in the folder given or
/// under it, as the FLUX.1-Redux-dev repo holds it).
pub fn redux_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let dir = resolve_model_dir(path)?;
    let candidates = [
        dir.join("flux1-redux-dev.safetensors"),
        dir.join("diffusion_pytorch_model.safetensors"),
        dir.join("image_embedder").join("diffusion_pytorch_model.safetensors"),
    ];
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        io_err(
            &dir,
            "no Redux model here (flux1-redux-dev.safetensors, or image_embedder/diffusion_pytorch_model.safetensors)",
        )
    })
}

/// Any single-file checkpoint (safetensors, PyTorch zip or GGUF, told apart
/// by content). The file stays mapped and its tensors are read as they are
/// used ([`TensorStore::from_safetensors_shared`],
/// [`TensorStore::from_torch_zip_shared`], [`TensorStore::from_gguf_shared`]).
pub fn load_store(path: &Path) -> Result<TensorStore> {
    store_from_map(map_file(path)?, path)
}

fn store_from_map(map: Mmap, path: &Path) -> Result<TensorStore> {
    let name = path.display().to_string();
    Ok(if is_torch_zip(&map) {
        TensorStore::from_torch_zip_shared(Arc::new(map), &name)?
    } else if gguf::is_gguf(&map) {
        TensorStore::from_gguf_shared(Arc::new(map), &name)?
    } else {
        TensorStore::from_safetensors_shared(Arc::new(map), &name)?
    })
}

/// `PK` (a zip: torch.save) or a legacy pickle's protocol byte.
pub(crate) fn is_torch_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK") || bytes.first() == Some(&0x80)
}

/// A path as given, or a Hugging Face repo id (`org/name`) looked up in the
/// local cache (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`); offline.
pub fn resolve_arg(arg: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    let s = arg.to_string_lossy();
    let is_repo_id = s.split('/').count() == 2 && !s.starts_with('.') && !s.contains('\\');
    if is_repo_id {
        let hub = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")));
        if let Some(hub) = hub {
            let entry = hub.join(format!("models--{}", s.replace('/', "--")));
            if entry.exists() {
                return Ok(entry);
            }
            return Err(io_err(arg, format!("no such file, and no Hugging Face cache entry at {}", entry.display())));
        }
    }
    Err(io_err(arg, "no such file or folder"))
}

/// Bytes of the weight files a model path stands for (a file, or the `.safetensors` in a folder).
pub fn weight_bytes(path: &Path) -> u64 {
    if path.is_file() {
        return path.metadata().map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Bytes a text encoder's weights take loaded in `dtype`, the figure its
/// registry entry holds: every weight converted to `dtype` as it loads (a
/// Q8_0 T5 takes twice its file's size in bf16, an f32 CLIP half its size
/// in bf16). What the encoder does not load does not count: integer buffers
/// (CLIP's `position_ids`), a whole CLIP's vision tower and projections, a
/// whole T5's decoder, and T5's `encoder.embed_tokens` beside the
/// `shared.weight` it is tied to.
pub fn text_encoder_bytes(files: &crate::generate::TextFiles, dtype: ipaflux_core::candle_core::DType) -> u64 {
    let w = &files.weights;
    let tied = w.contains("shared.weight");
    w.bytes_as(dtype, |n| {
        let other_tower = n.starts_with("vision_model.") || n.starts_with("decoder.");
        let head =
            matches!(n, "visual_projection.weight" | "text_projection.weight" | "logit_scale" | "lm_head.weight");
        !(other_tower || head || (tied && n == "encoder.embed_tokens.weight"))
    })
}

/// Flux's head size from a safetensors or GGUF header (no tensor data read): the QK-norm scale's length.
pub fn flux_head_dim_in(bytes: &[u8]) -> Option<usize> {
    let names = [
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "model.diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale",
        "transformer_blocks.0.attn.norm_q.weight",
        "single_blocks.0.norm.query_norm.scale",
        "single_transformer_blocks.0.attn.norm_q.weight",
    ];
    if gguf::is_gguf(bytes) {
        let file = gguf::parse(bytes).ok()?;
        return file.tensors.iter().find(|t| names.contains(&t.name.as_str())).and_then(|t| t.shape.first().copied());
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let tensors = meta.tensors();
    names.iter().find_map(|n| tensors.get(*n).and_then(|info| info.shape.first().copied()))
}

/// A Flux checkpoint's sizes, from its headers (no tensor data read; RoPE
/// axes not set).
pub fn flux_config(path: &Path) -> Result<ipaflux_core::flux::FluxConfig> {
    let files = load_flux(path)?;
    let (layout, store) = ipaflux_core::flux::FluxLayout::detect(files.weights)?;
    Ok(layout.infer(&store)?)
}

/// A Flux LoRA file (safetensors or a PyTorch zip; kohya, BFL or diffusers
/// names) read and checked for a Flux with `cfg`, applied at `strength`.
pub fn load_lora(
    path: &Path,
    cfg: &ipaflux_core::flux::FluxConfig,
    strength: f64,
) -> Result<ipaflux_core::flux::FluxLora> {
    Ok(ipaflux_core::flux::FluxLora::from_store(load_store(path)?, cfg, strength)?)
}

/// The folder of a Flux transformer and the file to read its header from.
pub fn flux_head_dim(path: &Path) -> Result<usize> {
    if path.is_file() {
        let map = map_file(path)?;
        return flux_head_dim_in(&map).ok_or_else(|| io_err(path, "no Flux attention norms in this file's header"));
    }
    let dir = flux_dir(path)?;
    let cfg = dir.join("config.json");
    if cfg.exists() {
        let v: serde_json::Value = serde_json::from_str(&read_text(&cfg)?).map_err(|e| io_err(&cfg, e))?;
        if let Some(d) = v.get("attention_head_dim").and_then(|d| d.as_u64()) {
            return Ok(d as usize);
        }
    }
    Ok(ipaflux_core::ip_adapter::FLUX_HEAD_DIM)
}

/// A text encoder from a diffusers FLUX.1 repo folder (`sub` = `text_encoder` for CLIP,
/// `text_encoder_2` for T5, tokenizers in `tokenizer`/`tokenizer_2`), one folder holding
/// `config.json`, the weights and `tokenizer.json`, or a single weights file as ComfyUI
/// keeps them (`t5xxl_fp16.safetensors`, `clip_l.safetensors`): then the config is the
/// FLUX.1 preset and `tokenizer` must name a `tokenizer.json` (or a folder / repo with one).
pub fn load_text_encoder(path: &Path, sub: &str, tokenizer: Option<&Path>) -> Result<crate::generate::TextFiles> {
    let tok_sub = sub.replace("text_encoder", "tokenizer");
    let read_tokenizer = |p: &Path| -> Result<Vec<u8>> {
        let p = if p.is_dir() {
            let dir = resolve_model_dir(p).unwrap_or_else(|_| p.to_path_buf());
            [dir.join("tokenizer.json"), dir.join(&tok_sub).join("tokenizer.json")]
                .into_iter()
                .find(|f| f.exists())
                .unwrap_or_else(|| dir.join("tokenizer.json"))
        } else {
            p.to_path_buf()
        };
        std::fs::read(&p).map_err(|e| io_err(&p, e))
    };
    if path.is_file() {
        let flag = if sub == "text_encoder_2" { "--t5-tokenizer" } else { "--clip-tokenizer" };
        let tok = tokenizer.ok_or_else(|| {
            io_err(
                path,
                format!(
                    "a single-file text encoder needs {flag} (its tokenizer.json, e.g. the FLUX.1 repo's {tok_sub}/)"
                ),
            )
        })?;
        let t5 = sub == "text_encoder_2";
        let config = if t5 { crate::text::T5_XXL_CONFIG } else { crate::text::CLIP_L_CONFIG };
        let map = map_file(path)?;
        let gguf_arch = gguf::is_gguf(&map).then(|| gguf::parse(&map).ok()?.architecture().map(str::to_string));
        let weights = match gguf_arch {
            None => store_from_map(map, path)?,
            Some(arch) if t5 && arch.as_deref().is_none_or(|a| a == "t5" || a == "t5encoder") => {
                store_from_map(map, path)?.filter_rename(|n| Some(t5_hf_name(n)))
            }
            Some(arch) => {
                let what = if t5 { "T5" } else { "CLIP (only T5 is read from GGUF)" };
                let arch = arch.unwrap_or_else(|| "unnamed".into());
                return Err(io_err(path, format!("this GGUF file holds a `{arch}` model, not {what}")));
            }
        };
        return Ok(crate::generate::TextFiles {
            config: config.to_string(),
            weights,
            tokenizer: read_tokenizer(&resolve_arg(tok)?)?,
        });
    }
    let dir = resolve_model_dir(path)?;
    let (model_dir, tok_dir) =
        if dir.join(sub).is_dir() { (dir.join(sub), dir.join(&tok_sub)) } else { (dir.clone(), dir) };
    let tokenizer = match tokenizer {
        Some(t) => read_tokenizer(&resolve_arg(t)?)?,
        None => read_tokenizer(&tok_dir)?,
    };
    Ok(crate::generate::TextFiles {
        config: read_text(&model_dir.join("config.json"))?,
        weights: load_safetensors_in(&model_dir, "model")?,
        tokenizer,
    })
}

/// The Hugging Face name of a tensor of a llama.cpp T5 encoder (GGUF:
/// `token_embd`, `enc.blk.N.attn_q`, ..., `enc.output_norm`), as
/// ComfyUI-GGUF maps them; other names are kept.
pub fn t5_hf_name(name: &str) -> String {
    const PARTS: [(&str, &str); 10] = [
        ("attn_q", "layer.0.SelfAttention.q"),
        ("attn_k", "layer.0.SelfAttention.k"),
        ("attn_v", "layer.0.SelfAttention.v"),
        ("attn_o", "layer.0.SelfAttention.o"),
        ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
        ("attn_norm", "layer.0.layer_norm"),
        ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
        ("ffn_up", "layer.1.DenseReluDense.wi_1"),
        ("ffn_down", "layer.1.DenseReluDense.wo"),
        ("ffn_norm", "layer.1.layer_norm"),
    ];
    let Some(stem) = name.strip_suffix(".weight") else { return name.to_string() };
    let hf = match stem {
        "token_embd" => Some("shared".to_string()),
        "enc.output_norm" => Some("encoder.final_layer_norm".to_string()),
        _ => stem.strip_prefix("enc.blk.").and_then(|rest| {
            let (block, part) = rest.split_once('.')?;
            let (_, hf) = PARTS.iter().find(|(p, _)| *p == part)?;
            Some(format!("encoder.block.{block}.{hf}"))
        }),
    };
    hf.map_or_else(|| name.to_string(), |hf| format!("{hf}.weight"))
}

/// The VAE's weights file: BFL's `ae.safetensors` (given, or in a repo
/// folder), or a diffusers `AutoencoderKL` folder's
/// `diffusion_pytorch_model.safetensors` (the folder given, or `vae/` in a
/// repo folder), whose `config.json` must carry FLUX.1's latent scale and
/// shift (the decoder applies those).
pub fn vae_file(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let dir = resolve_model_dir(path)?;
    let ae = dir.join("ae.safetensors");
    if ae.exists() {
        return Ok(ae);
    }
    for vae in [dir.clone(), dir.join("vae")] {
        let weights = vae.join("diffusion_pytorch_model.safetensors");
        if weights.exists() {
            check_vae_config(&vae.join("config.json"))?;
            return Ok(weights);
        }
    }
    Err(io_err(&dir, "no ae.safetensors here, nor a diffusers VAE (vae/diffusion_pytorch_model.safetensors)"))
}

/// A diffusers VAE config, if there is one, must be FLUX.1's: the same latent
/// channels' scale and shift the decoder uses.
fn check_vae_config(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&read_text(path)?).map_err(|e| io_err(path, e))?;
    let factor = |key: &str| v.get(key).and_then(serde_json::Value::as_f64);
    let want = [("scaling_factor", crate::vae::FLUX_VAE_SCALE), ("shift_factor", crate::vae::FLUX_VAE_SHIFT)];
    for (key, flux) in want {
        match factor(key) {
            Some(x) if (x - flux).abs() < 1e-6 => {}
            found => {
                return Err(io_err(
                    path,
                    format!("{key} is {found:?}, FLUX.1's VAE has {flux}: this is not a FLUX.1 VAE"),
                ))
            }
        }
    }
    Ok(())
}

/// One half of the VAE, as its tensors are named in either layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeHalf {
    /// `encoder.*`: loaded only to encode an init image.
    Encoder,
    /// `decoder.*`: loaded to decode every result.
    Decoder,
}

impl VaeHalf {
    fn prefix(self) -> &'static str {
        match self {
            VaeHalf::Encoder => "encoder.",
            VaeHalf::Decoder => "decoder.",
        }
    }
}

/// Bytes one half of the VAE takes loaded in `dtype`, from the file's header
/// (each half is loaded on its own, the other never with it).
pub fn vae_half_bytes(path: &Path, half: VaeHalf, dtype: ipaflux_core::candle_core::DType) -> Result<u64> {
    let map = map_file(path)?;
    // Not safetensors: sized as the file; loading it says what is wrong.
    Ok(vae_half_bytes_in(&map, half, dtype).unwrap_or_else(|| weight_bytes(path)))
}

/// [`vae_half_bytes`] of safetensors bytes in memory (`None`: not safetensors).
pub fn vae_half_bytes_in(bytes: &[u8], half: VaeHalf, dtype: ipaflux_core::candle_core::DType) -> Option<u64> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
    let tensors = meta.tensors().into_iter().filter(|(n, _)| n.starts_with(half.prefix()));
    let elements: usize = tensors.map(|(_, i)| i.shape.iter().product::<usize>()).sum();
    Some((elements * dtype.size_in_bytes()) as u64)
}

/// The VAE's tensors under BFL's `ae.safetensors` names (a diffusers VAE's renamed).
pub fn load_vae(path: &Path) -> Result<TensorStore> {
    let store = load_store(path)?;
    if crate::vae::is_diffusers(&store) {
        crate::vae::bfl_names(store)
    } else {
        Ok(store)
    }
}

/// Which registry unit of Flux a checkpoint tensor belongs to (BFL or
/// diffusers names, ComfyUI's prefix allowed): `Some(None)` for the embedders
/// and final layer, `Some(Some(block))` for a block, `None` for tensors that
/// are not Flux's (a VAE next to it in a BFL repo folder).
fn flux_unit_of(name: &str) -> Option<Option<ipaflux_core::flux::BlockId>> {
    use ipaflux_core::flux::BlockId;
    let name = name.strip_prefix("model.diffusion_model.").unwrap_or(name);
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    for (prefix, double) in [
        ("double_blocks.", true),
        ("single_blocks.", false),
        ("transformer_blocks.", true),
        ("single_transformer_blocks.", false),
    ] {
        if let Some(i) = name.strip_prefix(prefix).and_then(index) {
            return Some(Some(if double { BlockId::Double(i) } else { BlockId::Single(i) }));
        }
    }
    const BASE: [&str; 13] = [
        "img_in.",
        "time_in.",
        "vector_in.",
        "guidance_in.",
        "txt_in.",
        "final_layer.",
        "x_embedder.",
        "time_text_embed.",
        "context_embedder.",
        "norm_out.",
        "proj_out.",
        "distilled_guidance_layer.",
        "guidance_embedder.",
    ];
    BASE.iter().any(|p| name.starts_with(p)).then_some(None)
}

/// The sizes of Flux's registry units read from its safetensors headers (no
/// tensor data read), so the registry can plan partial loading before any
/// weight is loaded: the embedders and final layer, then every block in
/// execution order (`ipaflux_core::flux::stream::unit_specs`' order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FluxUnits {
    pub depth: usize,
    pub depth_single: usize,
    /// Per unit, what it holds.
    pub units: Vec<UnitContents>,
}

/// What one of Flux's registry units holds, by how its tensors are stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitContents {
    /// Elements stored in a 16/32-bit type (converted to the model dtype).
    pub wide: u64,
    /// Elements stored as fp8 (kept fp8 in memory).
    pub fp8: u64,
    /// Elements stored as GGML blocks (a GGUF file's), and the blocks' bytes.
    pub ggml: u64,
    pub ggml_bytes: u64,
    /// Elements of its largest GGML-quantized matrix.
    pub largest_ggml: u64,
}

impl FluxUnits {
    /// Registry units for a model computing in `dtype`, holding a GGUF file's quantized weights as `gguf` says.
    pub fn specs(&self, dtype: DType, gguf: GgufWeights) -> Vec<ipaflux_core::registry::UnitSpec> {
        let blocks = (0..self.depth)
            .map(|i| format!("double_blocks.{i}"))
            .chain((0..self.depth_single).map(|i| format!("single_blocks.{i}")));
        let size = dtype.size_in_bytes() as u64;
        std::iter::once(ipaflux_core::flux::stream::BASE_UNIT.to_string())
            .chain(blocks)
            .zip(&self.units)
            .map(|(name, u)| {
                let ggml = match gguf {
                    GgufWeights::Quantized => u.ggml_bytes,
                    GgufWeights::Dequantized => u.ggml * size,
                };
                ipaflux_core::registry::UnitSpec { name, bytes: u.wide * size + u.fp8 + ggml }
            })
            .collect()
    }

    /// Memory a step needs besides its activations when GGML weights are
    /// kept quantized ([`GgufWeights::Quantized`]): the largest matrix
    /// dequantized (f32, then `dtype`), and a streamed block arriving
    /// dequantized in each of the stream buffer's two slots (the registry
    /// sizes them by the quantized units). Zero for other checkpoints.
    /// With a LoRA (`with_lora`), a layer's change is also made, f32, beside its dequantized weight.
    pub fn kept_quantized_working(&self, dtype: DType, with_lora: bool) -> u64 {
        let size = dtype.size_in_bytes() as u64;
        let largest = self.units.iter().map(|u| u.largest_ggml).max().unwrap_or(0);
        let excess = self.units.iter().skip(1).map(|u| (u.ggml * size).saturating_sub(u.ggml_bytes)).max();
        let delta = if with_lora { 4 } else { 0 };
        largest * (4 + delta + size) + 2 * excess.unwrap_or(0)
    }

    /// [`Self::specs`] with the factors of `loras` added to the units whose
    /// layers keep them rather than merging them: units holding fp8 weights,
    /// or GGML blocks kept quantized. An upper bound where a unit mixes
    /// storage (its wide layers merge, yet their factors are counted too):
    /// the factors are a fraction of a percent of a block.
    pub fn specs_with_loras(
        &self,
        dtype: DType,
        gguf: GgufWeights,
        loras: &[ipaflux_core::flux::FluxLora],
    ) -> Vec<ipaflux_core::registry::UnitSpec> {
        let mut specs = self.specs(dtype, gguf);
        for lora in loras {
            for weight in lora.weights() {
                let unit = self.unit_of(weight);
                let Some(contents) = self.units.get(unit) else { continue };
                let keeps = contents.fp8 > 0 || (gguf == GgufWeights::Quantized && contents.ggml > 0);
                if let (true, Some(spec)) = (keeps, specs.get_mut(unit)) {
                    spec.bytes += lora.factor_bytes(weight);
                }
            }
        }
        specs
    }

    /// The unit index of canonical tensor `name` ([`Self::specs`]' order).
    fn unit_of(&self, name: &str) -> usize {
        let index = |prefix: &str| name.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok();
        match (index("double_blocks."), index("single_blocks.")) {
            (Some(i), _) => 1 + i,
            (_, Some(i)) => 1 + self.depth + i,
            _ => 0,
        }
    }

    /// The blocks behind registry unit indices of [`Self::specs`].
    pub fn blocks(&self, units: &[usize]) -> ipaflux_core::Result<Vec<ipaflux_core::flux::BlockId>> {
        let cfg = ipaflux_core::flux::FluxConfig {
            depth: self.depth,
            depth_single: self.depth_single,
            ..ipaflux_core::flux::FluxConfig::dev()
        };
        ipaflux_core::flux::stream::blocks_of_units(&cfg, units)
    }
}

/// [`FluxUnits`] of a Flux checkpoint (a safetensors or GGUF file, or a folder of `.safetensors` shards).
pub fn flux_units(path: &Path) -> Result<FluxUnits> {
    let files: Vec<PathBuf> = if path.is_file() {
        vec![path.to_path_buf()]
    } else {
        let dir = flux_dir(path)?;
        let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| io_err(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    };
    let maps = files.iter().map(|f| map_file(f)).collect::<Result<Vec<_>>>()?;
    let headers: Vec<(&[u8], String)> =
        maps.iter().zip(&files).map(|(m, f)| (&m[..], f.display().to_string())).collect();
    flux_units_in(&headers)
}

/// How a tensor is stored, for [`UnitContents`].
enum Stored {
    Wide,
    Fp8,
    /// GGML blocks of this many bytes.
    Ggml(u64),
}

/// [`FluxUnits`] from safetensors or GGUF files in memory (bytes, name for errors).
pub fn flux_units_in(files: &[(&[u8], String)]) -> Result<FluxUnits> {
    use ipaflux_core::flux::BlockId;
    let mut base = UnitContents::default();
    let mut blocks: BTreeMap<BlockId, UnitContents> = BTreeMap::new();
    for (bytes, name) in files {
        let tensors: Vec<(String, usize, Stored)> = if gguf::is_gguf(bytes) {
            let file = gguf::parse(bytes).map_err(|e| io_err(Path::new(name), e))?;
            let stored = |t: &gguf::GgufTensor| {
                if t.ty.is_quantized() {
                    Stored::Ggml(t.range.len() as u64)
                } else {
                    Stored::Wide
                }
            };
            file.tensors.iter().map(|t| (t.name.clone(), t.shape.iter().product(), stored(t))).collect()
        } else {
            let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| io_err(Path::new(name), e))?;
            let stored = |d| if d == safetensors::Dtype::F8_E4M3 { Stored::Fp8 } else { Stored::Wide };
            meta.tensors().into_iter().map(|(n, i)| (n, i.shape.iter().product(), stored(i.dtype))).collect()
        };
        for (tensor, n, stored) in tensors {
            let Some(unit) = flux_unit_of(&tensor) else { continue };
            let slot = match unit {
                None => &mut base,
                Some(b) => blocks.entry(b).or_default(),
            };
            let n = n as u64;
            match stored {
                Stored::Wide => slot.wide += n,
                Stored::Fp8 => slot.fp8 += n,
                Stored::Ggml(bytes) => {
                    slot.ggml += n;
                    slot.ggml_bytes += bytes;
                    slot.largest_ggml = slot.largest_ggml.max(n);
                }
            }
        }
    }
    if blocks.is_empty() {
        return Ok(FluxUnits::default()); // not a Flux checkpoint we can read headers of: one unit
    }
    let depth = blocks.keys().filter(|b| matches!(b, BlockId::Double(_))).count();
    let depth_single = blocks.len() - depth;
    let mut units = vec![base];
    units.extend(blocks.values().copied()); // BlockId orders doubles first, by index
    Ok(FluxUnits { depth, depth_single, units })
}

#[cfg(test)]
mod tests {
    use ipaflux_core::candle_core::{DType, Device};
    use ipaflux_core::flux::stream::unit_specs;
    use ipaflux_core::flux::{BlockId, FluxModel};

    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
    }

    #[test]
    fn flux_units_from_headers_equal_the_loaded_model_units() {
        // The diffusers-layout shards of the tiny fixture: separate q/k/v, other names.
        let path = fixture("flux/transformer");
        let units = flux_units(&path).unwrap();
        let files = load_flux(&path).unwrap();
        let model = FluxModel::from_store(files.weights, files.axes_dim, DType::F32, &Device::Cpu).unwrap();
        assert_eq!((units.depth, units.depth_single), (model.cfg.depth, model.cfg.depth_single));
        for dtype in [DType::F32, DType::BF16] {
            assert_eq!(units.specs(dtype, GgufWeights::Quantized), unit_specs(&model.cfg, dtype));
        }
        assert_eq!(units.kept_quantized_working(DType::BF16, false), 0);
        let n = units.units.len();
        assert_eq!(units.blocks(&[1, n - 1]).unwrap(), [BlockId::Double(0), BlockId::Single(units.depth_single - 1)]);
    }

    #[test]
    fn a_gguf_flux_has_the_units_and_head_size_of_its_model_and_other_architectures_are_refused() {
        let path = fixture("flux/flux-tiny-bfl.gguf");
        let units = flux_units(&path).unwrap();
        let weights = load_flux(&path).unwrap().weights;
        let model = FluxModel::from_store(weights, Some(vec![4, 6, 6]), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(units.specs(DType::BF16, GgufWeights::Dequantized), unit_specs(&model.cfg, DType::BF16));
        // Kept quantized: the blocks' bytes instead (the fixture quantizes 9 matrices).
        let (kept, dense) =
            (units.specs(DType::BF16, GgufWeights::Quantized), units.specs(DType::BF16, GgufWeights::Dequantized));
        let store = load_store(&path).unwrap();
        let saved: u64 = store
            .names()
            .filter(|n| store.ggml_type(n).is_some())
            .map(|n| {
                store.shape(n).unwrap().iter().product::<usize>() as u64 * 2 - store.stored_bytes(n).unwrap() as u64
            })
            .sum();
        let total = |s: &[ipaflux_core::registry::UnitSpec]| s.iter().map(|u| u.bytes).sum::<u64>();
        assert_eq!(total(&dense) - total(&kept), saved);
        assert!(units.kept_quantized_working(DType::BF16, false) > 0);
        assert_eq!(flux_head_dim(&path).unwrap(), 16);
        let e = load_flux(&fixture("gguf/ggml-types.gguf")).err().unwrap().to_string();
        assert!(e.contains("holds a `ipaflux-test` model, not Flux"), "{e}");
    }

    #[test]
    fn the_vae_counts_each_half_at_the_compute_dtype_in_either_layout() {
        let elements = |store: &TensorStore, decoder: bool| -> usize {
            let names = store.names().filter(|n| !decoder || n.starts_with("decoder."));
            names.map(|n| store.shape(n).unwrap().iter().product::<usize>()).sum()
        };
        let ae = fixture("pipeline/ae.safetensors");
        let decoder = elements(&load_store(&ae).unwrap(), true);
        assert_eq!(vae_half_bytes(&ae, VaeHalf::Decoder, DType::F32).unwrap(), 4 * decoder as u64);
        assert_eq!(vae_half_bytes(&ae, VaeHalf::Encoder, DType::F32).unwrap(), 0, "a decoder-only file");
        // The diffusers folder's file also holds the encoder, which is not counted.
        let diffusers = vae_file(&fixture("pipeline/vae")).unwrap();
        assert!(elements(&load_store(&diffusers).unwrap(), false) > decoder);
        assert_eq!(vae_half_bytes(&diffusers, VaeHalf::Decoder, DType::BF16).unwrap(), 2 * decoder as u64);
        // A whole VAE: the two halves add up to the file.
        let whole = fixture("img2img/ae.safetensors");
        let all = elements(&load_store(&whole).unwrap(), false) as u64;
        let [e, d] = [VaeHalf::Encoder, VaeHalf::Decoder].map(|h| vae_half_bytes(&whole, h, DType::F16).unwrap());
        assert!(e > 0 && d > 0 && e + d == 2 * all, "{e} + {d} != 2 · {all}");
    }

    #[test]
    fn lora_factors_count_only_where_layers_keep_them() {
        let lora_path = fixture("flux/lora-kohya.safetensors");
        let total = |s: &[ipaflux_core::registry::UnitSpec]| s.iter().map(|u| u.bytes).sum::<u64>();
        // bf16 file: every LoRA merges into the dense weights; nothing added.
        let wide = flux_units(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
        let cfg = flux_config(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
        let lora = load_lora(&lora_path, &cfg, 0.8).unwrap();
        let (q, loras) = (GgufWeights::Quantized, std::slice::from_ref(&lora));
        assert_eq!(wide.specs_with_loras(DType::BF16, q, loras), wide.specs(DType::BF16, q));
        // fp8 file: the factors stay beside the fp8 weights; every one of them counted, in its block's unit.
        let fp8 = flux_units(&fixture("flux/flux-tiny-bfl-fp8.safetensors")).unwrap();
        let (with, without) = (fp8.specs_with_loras(DType::BF16, q, loras), fp8.specs(DType::BF16, q));
        let factors: u64 = lora.weights().map(|w| lora.factor_bytes(w)).sum();
        assert!(factors > 0);
        assert_eq!(total(&with) - total(&without), factors);
        let block = lora.factor_bytes("single_blocks.2.linear1.weight")
            + lora.factor_bytes("single_blocks.2.linear2.weight")
            + lora.factor_bytes("single_blocks.2.modulation.lin.weight");
        let last = with.len() - 1;
        assert_eq!(with[last].bytes - without[last].bytes, block);
        // A GGUF file: counted kept quantized, not dequantized at load.
        let gguf = flux_units(&fixture("flux/flux-tiny-bfl.gguf")).unwrap();
        let d = GgufWeights::Dequantized;
        assert_eq!(gguf.specs_with_loras(DType::BF16, d, loras), gguf.specs(DType::BF16, d));
        assert!(total(&gguf.specs_with_loras(DType::BF16, q, loras)) > total(&gguf.specs(DType::BF16, q)));
        assert!(gguf.kept_quantized_working(DType::BF16, true) > gguf.kept_quantized_working(DType::BF16, false));
    }

    #[test]
    fn a_gguf_text_encoder_counts_at_the_size_it_loads_to() {
        let path = fixture("pipeline/t5-encoder.gguf");
        let tok = fixture("pipeline/t5/tokenizer.json");
        let files = load_text_encoder(&path, "text_encoder_2", Some(&tok)).unwrap();
        let w = &files.weights;
        // Q8_0 matrices and the F32 vectors alike at 2 bytes an element (bf16).
        let want: usize = w.names().map(|n| w.shape(n).unwrap().iter().product::<usize>() * 2).sum();
        assert_eq!(text_encoder_bytes(&files, DType::BF16), want as u64);
        assert!(want as u64 > weight_bytes(&path), "more than the file's quantized blocks");
        // What T5 fetches as it builds (the preset's config: a single file has none).
        let config = std::fs::read_to_string(fixture("pipeline/t5/config.json")).unwrap();
        let _ = crate::text::T5Encoder::new(&config, w, &files.tokenizer, 16, DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(w.fetched_bytes(), want as u64);
    }

    #[test]
    fn mapped_checkpoints_are_read_when_used_and_equal_the_copied_ones() {
        // Both formats: the InstantX pickle zip and a safetensors file.
        for rel in ["ip-adapter.bin", "ip-adapter.safetensors"] {
            let mapped = load_store(&fixture(rel)).unwrap();
            assert_eq!(mapped.read_bytes(), 0, "{rel}: nothing read before use");
            let bytes = std::fs::read(fixture(rel)).unwrap();
            let copied = if is_torch_zip(&bytes) {
                TensorStore::from_torch_zip(&bytes, rel).unwrap()
            } else {
                TensorStore::from_safetensors(&bytes, rel).unwrap()
            };
            assert_eq!(copied.read_bytes(), copied.nbytes());
            assert_eq!(mapped.names().collect::<Vec<_>>(), copied.names().collect::<Vec<_>>());
            for name in copied.names() {
                let (a, b) = (mapped.get(name).unwrap().unwrap(), copied.get(name).unwrap().unwrap());
                assert_eq!((a.dtype(), a.dims()), (b.dtype(), b.dims()), "{rel}: {name}");
                let diff = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
                assert_eq!(diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
            }
            assert_eq!(mapped.read_bytes(), mapped.nbytes());
        }
    }

    #[test]
    fn flux_unit_names_in_both_layouts() {
        assert_eq!(
            flux_unit_of("model.diffusion_model.double_blocks.3.img_mod.lin.weight"),
            Some(Some(BlockId::Double(3)))
        );
        assert_eq!(flux_unit_of("single_transformer_blocks.12.proj_out.weight"), Some(Some(BlockId::Single(12))));
        assert_eq!(flux_unit_of("transformer_blocks.0.attn.to_q.weight"), Some(Some(BlockId::Double(0))));
        assert_eq!(flux_unit_of("proj_out.weight"), Some(None));
        assert_eq!(flux_unit_of("final_layer.linear.bias"), Some(None));
        assert_eq!(flux_unit_of("decoder.conv_in.weight"), None);
    }
}
