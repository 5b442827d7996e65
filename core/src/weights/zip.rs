//! A minimal reader for the uncompressed ("stored") zip archives that
//! `torch.save` writes, ZIP64 included (the real InstantX `ip-adapter.bin` is
//! 5.3 GB). It only locates entries in a byte slice; it never decompresses and
//! never touches the file system. Layout per PKWARE's APPNOTE.TXT.

use std::collections::BTreeMap;

/// Where one stored entry's bytes lie inside the archive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Entry {
    pub offset: usize,
    pub len: usize,
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;
const ZIP64_EXTRA_ID: u16 = 0x0001;
const EOCD_LEN: usize = 22;
const MAX_COMMENT: usize = 0xFFFF;

fn u16_at(b: &[u8], at: usize) -> Result<u16, String> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or_else(|| format!("truncated at byte {at}"))
}
fn u32_at(b: &[u8], at: usize) -> Result<u32, String> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| format!("truncated at byte {at}"))
}
fn u64_at(b: &[u8], at: usize) -> Result<u64, String> {
    let s = b.get(at..at + 8).ok_or_else(|| format!("truncated at byte {at}"))?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}
fn to_usize(v: u64) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("offset {v} does not fit this platform's address space"))
}

/// Reads the central directory: entry name → location of its stored bytes.
pub(crate) fn read_entries(bytes: &[u8]) -> Result<BTreeMap<String, Entry>, String> {
    if bytes.len() < EOCD_LEN {
        return Err("too short to be a zip archive".into());
    }
    let search_from = bytes.len().saturating_sub(EOCD_LEN + MAX_COMMENT);
    let eocd = (search_from..=bytes.len() - EOCD_LEN)
        .rev()
        .find(|&i| u32_at(bytes, i).ok() == Some(EOCD_SIG))
        .ok_or("no end-of-central-directory record (file truncated or not a zip archive)")?;
    let mut count = u64::from(u16_at(bytes, eocd + 10)?);
    let mut cd_offset = u64::from(u32_at(bytes, eocd + 16)?);
    // ZIP64: the locator sits right before the classic record.
    if eocd >= 20 && u32_at(bytes, eocd - 20)? == EOCD64_LOCATOR_SIG {
        let rec = to_usize(u64_at(bytes, eocd - 20 + 8)?)?;
        if u32_at(bytes, rec)? != EOCD64_SIG {
            return Err("broken ZIP64 end-of-central-directory record".into());
        }
        count = u64_at(bytes, rec + 32)?;
        cd_offset = u64_at(bytes, rec + 48)?;
    }
    let mut at = to_usize(cd_offset)?;
    let mut entries = BTreeMap::new();
    for _ in 0..count {
        if u32_at(bytes, at)? != CENTRAL_SIG {
            return Err(format!("corrupt central directory at byte {at}"));
        }
        let method = u16_at(bytes, at + 10)?;
        let mut comp_size = u64::from(u32_at(bytes, at + 20)?);
        let mut size = u64::from(u32_at(bytes, at + 24)?);
        let name_len = usize::from(u16_at(bytes, at + 28)?);
        let extra_len = usize::from(u16_at(bytes, at + 30)?);
        let comment_len = usize::from(u16_at(bytes, at + 32)?);
        let mut local = u64::from(u32_at(bytes, at + 42)?);
        let name_bytes = bytes.get(at + 46..at + 46 + name_len).ok_or("truncated entry name")?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        // ZIP64 extra field: the 64-bit values appear in order for each 0xFFFFFFFF field.
        let mut x = at + 46 + name_len;
        let extra_end = x + extra_len;
        while x + 4 <= extra_end {
            let id = u16_at(bytes, x)?;
            let len = usize::from(u16_at(bytes, x + 2)?);
            if id == ZIP64_EXTRA_ID {
                let mut p = x + 4;
                for field in [&mut size, &mut comp_size, &mut local] {
                    if *field == u64::from(u32::MAX) {
                        *field = u64_at(bytes, p)?;
                        p += 8;
                    }
                }
            }
            x += 4 + len;
        }
        if method != 0 {
            return Err(format!("entry `{name}` is compressed (method {method}); only stored entries are supported"));
        }
        if comp_size != size {
            return Err(format!("entry `{name}` has inconsistent sizes"));
        }
        let local = to_usize(local)?;
        if u32_at(bytes, local)? != LOCAL_SIG {
            return Err(format!("entry `{name}`: bad local header"));
        }
        let data = local + 30 + usize::from(u16_at(bytes, local + 26)?) + usize::from(u16_at(bytes, local + 28)?);
        let len = to_usize(size)?;
        if data.checked_add(len).is_none_or(|end| end > bytes.len()) {
            return Err(format!("entry `{name}` runs past the end of the file (truncated?)"));
        }
        entries.insert(name, Entry { offset: data, len });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(entries)
}
