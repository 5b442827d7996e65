//! The Flux text encoders: T5 (v1.1-XXL: every token's hidden state) and the
//! CLIP-L text tower (pooled output at the end token), with their Hugging Face
//! `tokenizer.json`. The transformer math is candle-transformers' T5 and CLIP;
//! this module adds tokenizing exactly as the Flux pipelines do (pad to a fixed
//! length, truncate, no attention mask) and CLIP pooling as transformers does.

use ipaflux_core::candle_core::{DType, Device, IndexOp, Tensor};
use ipaflux_core::TensorStore;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::{Error, Result};

/// T5 sequence length for FLUX.1-dev (schnell uses 256).
pub const T5_MAX_LEN_DEV: usize = 512;
/// T5 sequence length for FLUX.1-schnell.
pub const T5_MAX_LEN_SCHNELL: usize = 256;

/// google/t5-v1_1-xxl's encoder config, for single-file T5 checkpoints (ComfyUI's `t5xxl_*.safetensors`).
pub const T5_XXL_CONFIG: &str = r#"{"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
  "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
  "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": true,
  "tie_word_embeddings": false, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}"#;

/// openai/clip-vit-large-patch14's text config, for single-file CLIP-L checkpoints (ComfyUI's `clip_l.safetensors`).
pub const CLIP_L_CONFIG: &str = r#"{"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
  "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
  "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "projection_dim": 768}"#;

fn text_err(what: &str, reason: impl std::fmt::Display) -> Error {
    Error::Core(ipaflux_core::Error::Unsupported(format!("{what}: {reason}")))
}

/// A tokenizer that pads with `pad` and truncates to `max_len`, adding the special tokens.
fn fixed_length_tokenizer(json: &[u8], name: &str, max_len: usize, pad: &str) -> Result<Tokenizer> {
    let mut tok =
        Tokenizer::from_bytes(json).map_err(|e| text_err(name, format!("not a usable tokenizer.json: {e}")))?;
    let pad_id = tok.token_to_id(pad).ok_or_else(|| text_err(name, format!("the tokenizer has no `{pad}` token")))?;
    tok.with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
        .map_err(|e| text_err(name, e))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_len),
        pad_id,
        pad_token: pad.to_string(),
        ..Default::default()
    }));
    Ok(tok)
}

fn token_ids(tok: &Tokenizer, prompt: &str, name: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(prompt, true).map_err(|e| text_err(name, e))?.get_ids().to_vec())
}

/// The T5 encoder with its tokenizer.
pub struct T5Encoder {
    model: candle_transformers::models::t5::T5EncoderModel,
    tokenizer: Tokenizer,
    device: Device,
}

impl T5Encoder {
    /// From `config.json` text, weights (`encoder.*`, `shared.weight` or `encoder.embed_tokens.weight`),
    /// `tokenizer.json` bytes. f16 is refused: T5 overflows in it.
    pub fn new(
        config_json: &str,
        weights: &TensorStore,
        tokenizer_json: &[u8],
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let name = &weights.source_name;
        if dtype == DType::F16 {
            return Err(text_err(name, "T5 overflows in f16; use f32 or bf16"));
        }
        let cfg: candle_transformers::models::t5::Config =
            serde_json::from_str(config_json).map_err(|e| text_err(name, format!("config.json: {e}")))?;
        let model = candle_transformers::models::t5::T5EncoderModel::load(weights.var_builder(dtype, device), &cfg)
            .map_err(|e| text_err(name, format!("not a T5 encoder checkpoint: {e}")))?;
        let tokenizer = fixed_length_tokenizer(tokenizer_json, name, max_len, "<pad>")?;
        Ok(Self { model, tokenizer, device: device.clone() })
    }

    /// Token ids and the last hidden state `[1, max_len, d_model]`.
    pub fn encode(&mut self, prompt: &str) -> Result<(Vec<u32>, Tensor)> {
        let ids = token_ids(&self.tokenizer, prompt, "T5 tokenizer")?;
        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        Ok((ids, self.model.forward(&input)?))
    }
}

/// The CLIP text tower with its tokenizer.
pub struct ClipEncoder {
    model: candle_transformers::models::clip::text_model::ClipTextTransformer,
    tokenizer: Tokenizer,
    /// transformers' rule: a config `eos_token_id` of 2 (the original CLIP configs) means
    /// "pool at the highest id"; otherwise pool at the first end token.
    eos_id: Option<u32>,
    device: Device,
}

impl ClipEncoder {
    /// From `config.json` (`CLIPTextModel` or full `CLIPModel` with `text_config`), weights (`text_model.*` or
    /// unprefixed), `tokenizer.json`.
    pub fn new(
        config_json: &str,
        weights: &TensorStore,
        tokenizer_json: &[u8],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
        let name = &weights.source_name;
        let v: serde_json::Value =
            serde_json::from_str(config_json).map_err(|e| text_err(name, format!("config.json: {e}")))?;
        let v = v.get("text_config").cloned().unwrap_or(v);
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| text_err(name, format!("config.json has no `{k}`")))
        };
        let act = v.get("hidden_act").and_then(|a| a.as_str()).unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(text_err(name, format!("hidden_act `{act}` is not supported (CLIP-L uses quick_gelu)")));
        }
        let cfg = ClipTextConfig {
            vocab_size: get("vocab_size")?,
            embed_dim: get("hidden_size")?,
            activation: Activation::QuickGelu,
            intermediate_size: get("intermediate_size")?,
            max_position_embeddings: get("max_position_embeddings")?,
            pad_with: None,
            num_hidden_layers: get("num_hidden_layers")?,
            num_attention_heads: get("num_attention_heads")?,
            projection_dim: get("projection_dim").unwrap_or(768),
        };
        // `CLIPTextModel` files name the tower `text_model.*`; some exports drop the prefix.
        let vb = weights.var_builder(dtype, device);
        let vb = if weights.contains("embeddings.token_embedding.weight") { vb } else { vb.pp("text_model") };
        let model = ClipTextTransformer::new(vb, &cfg)
            .map_err(|e| text_err(name, format!("not a CLIP text checkpoint: {e}")))?;
        let eos = "<|endoftext|>";
        let tokenizer = fixed_length_tokenizer(tokenizer_json, name, cfg.max_position_embeddings, eos)?;
        let eos_id = match v.get("eos_token_id").and_then(|x| x.as_u64()) {
            Some(2) => None,
            _ => tokenizer.token_to_id(eos),
        };
        Ok(Self { model, tokenizer, eos_id, device: device.clone() })
    }

    /// Token ids and the pooled output `[1, hidden]`.
    pub fn encode(&self, prompt: &str) -> Result<(Vec<u32>, Tensor)> {
        let ids = token_ids(&self.tokenizer, prompt, "CLIP tokenizer")?;
        let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let hidden = self.model.forward_with_mask(&input, usize::MAX)?;
        let pos = match self.eos_id {
            Some(eos) => ids.iter().position(|&t| t == eos),
            // First position of the largest id, as torch's argmax.
            None => ids
                .iter()
                .enumerate()
                .fold(None, |best: Option<(usize, u32)>, (i, &t)| match best {
                    Some((_, b)) if b >= t => best,
                    _ => Some((i, t)),
                })
                .map(|(i, _)| i),
        }
        .unwrap_or(ids.len().saturating_sub(1));
        Ok((ids, hidden.i((.., pos, ..))?))
    }
}
