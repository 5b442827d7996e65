//! A JPEG decoder whose output is byte-identical to libjpeg-turbo's default
//! decode (what Pillow, and so transformers' image processors, use).
//!
//! Why our own: general-purpose Rust decoders use other IDCTs, chroma
//! upsamplers and colour-conversion roundings, which move decoded samples by a
//! few levels. Here every step follows libjpeg-turbo's default path, written
//! from its documented algorithms: Huffman decoding (sequential and
//! progressive, with restart intervals), the "islow" integer IDCT (Loeffler–
//! Ligtenberg–Moschytz, 13-bit constants, 2 extra bits in the first pass) with
//! its post-IDCT range limiting, "fancy" (triangle) chroma upsampling for 2:1
//! ratios and box replication for other integral ones, and the 16-bit
//! fixed-point YCbCr→RGB tables.
//!
//! Scope: 8-bit Huffman-coded JPEGs (SOF0/1/2) with one (grey) or three
//! (YCbCr, or RGB per the Adobe marker) components. Anything else returns
//! [`Unsupported`] so the caller can use another decoder. Corrupt data is an
//! error, never a panic.

/// Why a JPEG was not decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JpegError {
    /// A JPEG this decoder does not cover (arithmetic coding, 12-bit, CMYK, ...).
    Unsupported(String),
    /// Malformed or truncated data.
    Corrupt(String),
}

use JpegError::{Corrupt, Unsupported};

type Res<T> = std::result::Result<T, JpegError>;

/// A decoded image: 8-bit samples, row-major, `channels` per pixel (1 or 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Component {
    id: u8,
    h: usize,
    v: usize,
    tq: usize,
    /// Blocks per line / column covering the MCU-padded component.
    bw: usize,
    bh: usize,
    /// Coefficients in natural (row-major) order, 64 per block.
    coefs: Vec<i16>,
    dc_table: usize,
    ac_table: usize,
    dc_pred: i32,
}

#[derive(Debug, Clone, Default)]
struct Huffman {
    /// (code length, code) → symbol, via canonical-code tables.
    maxcode: [i32; 18],
    valptr: [i32; 17],
    mincode: [i32; 17],
    values: Vec<u8>,
    /// Fast lookup on the next 9 bits: (length, symbol), length 0 = slow path.
    fast: Vec<(u8, u8)>,
}

const FAST_BITS: usize = 9;

/// Largest image decoded (the same limit as [`crate::preprocess::MAX_PIXELS`]).
const MAX_PIXELS: usize = 64 * 1024 * 1024;

impl Huffman {
    fn new(counts: &[u8; 16], values: Vec<u8>) -> Res<Self> {
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if total != values.len() || total > 256 {
            return Err(Corrupt("bad Huffman table".into()));
        }
        let mut h = Huffman { values, fast: vec![(0, 0); 1 << FAST_BITS], ..Default::default() };
        let mut code = 0i32;
        let mut k = 0usize;
        for len in 1..=16 {
            let n = usize::from(counts[len - 1]);
            h.valptr[len] = k as i32;
            h.mincode[len] = code;
            for _ in 0..n {
                if len <= FAST_BITS {
                    let shift = FAST_BITS - len;
                    let base = (code as usize) << shift;
                    for fill in 0..(1 << shift) {
                        if let Some(slot) = h.fast.get_mut(base | fill) {
                            *slot = (len as u8, h.values[k]);
                        }
                    }
                }
                code += 1;
                k += 1;
            }
            h.maxcode[len] = if n > 0 { code - 1 } else { -1 };
            if code > (1 << len) {
                return Err(Corrupt("bad Huffman table (over-subscribed)".into()));
            }
            code <<= 1;
        }
        h.maxcode[17] = i32::MAX;
        Ok(h)
    }
}

/// Entropy-coded data reader: bytes with 0xFF00 stuffing, stops at markers.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    nbits: u32,
    /// A marker was reached; further bits read as zeros (as libjpeg does).
    hit_marker: bool,
}

impl<'a> Bits<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        Self { data, pos, acc: 0, nbits: 0, hit_marker: false }
    }

    fn fill(&mut self) {
        while self.nbits <= 56 {
            let mut byte = 0u8;
            if !self.hit_marker {
                match self.data.get(self.pos) {
                    Some(0xFF) => match self.data.get(self.pos + 1) {
                        Some(0x00) => {
                            byte = 0xFF;
                            self.pos += 2;
                        }
                        _ => self.hit_marker = true,
                    },
                    Some(&b) => {
                        byte = b;
                        self.pos += 1;
                    }
                    None => self.hit_marker = true,
                }
            }
            self.acc |= u64::from(byte) << (56 - self.nbits);
            self.nbits += 8;
        }
    }

    fn peek(&mut self, n: u32) -> u32 {
        if self.nbits < n {
            self.fill();
        }
        (self.acc >> (64 - n)) as u32
    }

    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.nbits -= n;
    }

    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let v = self.peek(n);
        self.consume(n);
        v
    }

    fn bit(&mut self) -> u32 {
        self.bits(1)
    }

    /// Reads `n` bits as a signed magnitude category value (JPEG's EXTEND).
    fn receive_extend(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        let v = self.bits(n) as i32;
        if v < (1 << (n - 1)) {
            v - (1 << n) + 1
        } else {
            v
        }
    }

    fn decode(&mut self, h: &Huffman) -> Res<u8> {
        let look = self.peek(FAST_BITS as u32) as usize;
        if let Some(&(len, sym)) = h.fast.get(look) {
            if len > 0 {
                self.consume(u32::from(len));
                return Ok(sym);
            }
        }
        let mut code = self.bits(1) as i32;
        let mut len = 1;
        while code > h.maxcode[len] {
            code = (code << 1) | self.bit() as i32;
            len += 1;
            if len > 16 {
                return Err(Corrupt("bad Huffman code".into()));
            }
        }
        let idx = h.valptr[len] + code - h.mincode[len];
        h.values.get(idx as usize).copied().ok_or_else(|| Corrupt("bad Huffman code".into()))
    }

    /// Byte-aligns and steps over an RSTn marker; returns the position after it.
    fn restart(&mut self) -> Res<()> {
        // Discard buffered bits; rewind the byte position for whole unread bytes.
        let unread_bytes = (self.nbits / 8) as usize;
        let mut pos = self.pos;
        if !self.hit_marker {
            // Bytes in the accumulator that came from data (stuffed 0xFF00 pairs
            // never precede a marker's byte alignment in valid streams).
            pos = pos.saturating_sub(unread_bytes);
        }
        while pos + 1 < self.data.len() && !(self.data[pos] == 0xFF && (0xD0..=0xD7).contains(&self.data[pos + 1])) {
            pos += 1;
        }
        if pos + 1 >= self.data.len() {
            return Err(Corrupt("missing restart marker".into()));
        }
        self.pos = pos + 2;
        self.acc = 0;
        self.nbits = 0;
        self.hit_marker = false;
        Ok(())
    }
}

/// Zigzag position → natural (row-major) index.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21,
    28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54,
    47, 55, 62, 63,
];

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    comps: Vec<Component>,
    hmax: usize,
    vmax: usize,
    mcux: usize,
    mcuy: usize,
}

struct Scan {
    comps: Vec<usize>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

/// Decodes a JPEG. See the module docs for what is covered.
pub fn decode(bytes: &[u8]) -> Res<Decoded> {
    let mut qt = [[0u16; 64]; 4];
    let mut dc_tables: [Option<Huffman>; 4] = Default::default();
    let mut ac_tables: [Option<Huffman>; 4] = Default::default();
    let mut frame: Option<Frame> = None;
    let mut restart_interval = 0usize;
    let mut adobe_transform: Option<u8> = None;
    let mut jfif = false;
    if bytes.get(0..2) != Some(&[0xFF, 0xD8]) {
        return Err(Corrupt("not a JPEG (no SOI marker)".into()));
    }
    let mut pos = 2;
    loop {
        // Find the next marker: like libjpeg, skip extraneous bytes (a warning
        // there, tolerated here) and 0xFF fill bytes.
        while pos < bytes.len() && !(bytes[pos] == 0xFF && bytes.get(pos + 1).is_some_and(|&b| b != 0xFF && b != 0)) {
            pos += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (bytes.get(pos), bytes.get(pos + 1)) else {
            return Err(Corrupt("truncated: expected a marker".into()));
        };
        pos += 2;
        if marker == 0xD9 {
            break;
        }
        if (0xD0..=0xD7).contains(&marker) || marker == 0x01 {
            continue;
        }
        let len = usize::from(u16::from_be_bytes([
            *bytes.get(pos).ok_or_else(|| Corrupt("truncated segment".into()))?,
            *bytes.get(pos + 1).ok_or_else(|| Corrupt("truncated segment".into()))?,
        ]));
        let seg = bytes.get(pos + 2..pos + len).ok_or_else(|| Corrupt("truncated segment".into()))?;
        if len < 2 {
            return Err(Corrupt("bad segment length".into()));
        }
        match marker {
            0xC0..=0xC2 => frame = Some(parse_frame(seg, marker == 0xC2)?),
            0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                return Err(Unsupported(format!("JPEG coding process SOF{}", marker - 0xC0)))
            }
            0xC4 => parse_dht(seg, &mut dc_tables, &mut ac_tables)?,
            0xDB => parse_dqt(seg, &mut qt)?,
            0xDD => {
                restart_interval = usize::from(u16::from_be_bytes([
                    *seg.first().ok_or_else(|| Corrupt("bad DRI".into()))?,
                    *seg.get(1).ok_or_else(|| Corrupt("bad DRI".into()))?,
                ]))
            }
            0xE0 if seg.starts_with(b"JFIF\0") => jfif = true,
            0xEE if seg.starts_with(b"Adobe") && seg.len() >= 12 => adobe_transform = Some(seg[11]),
            0xDA => {
                let f = frame.as_mut().ok_or_else(|| Corrupt("scan before frame header".into()))?;
                let scan = parse_sos(seg, f)?;
                let tables = (&dc_tables, &ac_tables);
                pos = decode_scan(bytes, pos + len, f, &scan, tables, restart_interval)?;
                continue;
            }
            _ => {}
        }
        pos += len;
    }
    let f = frame.ok_or_else(|| Corrupt("no frame header".into()))?;
    finish(f, &qt, jfif, adobe_transform)
}

fn parse_frame(seg: &[u8], progressive: bool) -> Res<Frame> {
    let bad = || Corrupt("bad frame header".into());
    if seg.len() < 6 {
        return Err(bad());
    }
    if seg[0] != 8 {
        return Err(Unsupported(format!("{}-bit JPEG", seg[0])));
    }
    let height = usize::from(u16::from_be_bytes([seg[1], seg[2]]));
    let width = usize::from(u16::from_be_bytes([seg[3], seg[4]]));
    let n = usize::from(seg[5]);
    if width == 0 || height == 0 {
        return Err(Corrupt("zero image size (or a DNL marker, which is not supported)".into()));
    }
    if width * height > MAX_PIXELS {
        return Err(Unsupported(format!("{width}×{height} is over {MAX_PIXELS} pixels")));
    }
    if n != 1 && n != 3 {
        return Err(Unsupported(format!("JPEG with {n} components")));
    }
    let mut comps = Vec::new();
    for i in 0..n {
        let c = seg.get(6 + 3 * i..9 + 3 * i).ok_or_else(bad)?;
        let (h, v) = (usize::from(c[1] >> 4), usize::from(c[1] & 15));
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) || c[2] > 3 {
            return Err(bad());
        }
        comps.push(Component {
            id: c[0],
            h,
            v,
            tq: usize::from(c[2]),
            bw: 0,
            bh: 0,
            coefs: Vec::new(),
            dc_table: 0,
            ac_table: 0,
            dc_pred: 0,
        });
    }
    let hmax = comps.iter().map(|c| c.h).max().unwrap_or(1);
    let vmax = comps.iter().map(|c| c.v).max().unwrap_or(1);
    let mcux = width.div_ceil(8 * hmax);
    let mcuy = height.div_ceil(8 * vmax);
    for c in &mut comps {
        c.bw = mcux * c.h;
        c.bh = mcuy * c.v;
        c.coefs = vec![0; c.bw * c.bh * 64];
    }
    Ok(Frame { width, height, progressive, comps, hmax, vmax, mcux, mcuy })
}

fn parse_dht(seg: &[u8], dc: &mut [Option<Huffman>; 4], ac: &mut [Option<Huffman>; 4]) -> Res<()> {
    let mut p = 0;
    while p < seg.len() {
        let tc = seg[p] >> 4;
        let th = usize::from(seg[p] & 15);
        let counts: [u8; 16] =
            seg.get(p + 1..p + 17).and_then(|s| s.try_into().ok()).ok_or_else(|| Corrupt("bad DHT".into()))?;
        let total: usize = counts.iter().map(|&c| usize::from(c)).sum();
        let values = seg.get(p + 17..p + 17 + total).ok_or_else(|| Corrupt("bad DHT".into()))?.to_vec();
        let table = Huffman::new(&counts, values)?;
        match (tc, th) {
            (0, 0..=3) => dc[th] = Some(table),
            (1, 0..=3) => ac[th] = Some(table),
            _ => return Err(Corrupt("bad DHT class or id".into())),
        }
        p += 17 + total;
    }
    Ok(())
}

fn parse_dqt(seg: &[u8], qt: &mut [[u16; 64]; 4]) -> Res<()> {
    let mut p = 0;
    while p < seg.len() {
        let pq = seg[p] >> 4;
        let tq = usize::from(seg[p] & 15);
        if tq > 3 {
            return Err(Corrupt("bad DQT id".into()));
        }
        for k in 0..64 {
            let v = if pq == 0 {
                seg.get(p + 1 + k).map(|&b| u16::from(b))
            } else {
                seg.get(p + 1 + 2 * k..p + 3 + 2 * k).map(|b| u16::from_be_bytes([b[0], b[1]]))
            };
            qt[tq][ZIGZAG[k]] = v.ok_or_else(|| Corrupt("bad DQT".into()))?;
        }
        p += 1 + if pq == 0 { 64 } else { 128 };
    }
    Ok(())
}

fn parse_sos(seg: &[u8], f: &mut Frame) -> Res<Scan> {
    let bad = || Corrupt("bad scan header".into());
    let n = usize::from(*seg.first().ok_or_else(bad)?);
    if n == 0 || n > 4 || seg.len() < 1 + 2 * n + 3 {
        return Err(bad());
    }
    let mut comps = Vec::new();
    for i in 0..n {
        let id = seg[1 + 2 * i];
        let t = seg[2 + 2 * i];
        let ci = f.comps.iter().position(|c| c.id == id).ok_or_else(bad)?;
        f.comps[ci].dc_table = usize::from(t >> 4);
        f.comps[ci].ac_table = usize::from(t & 15);
        comps.push(ci);
    }
    let p = 1 + 2 * n;
    let (ss, se, ah, al) =
        (usize::from(seg[p]), usize::from(seg[p + 1]), u32::from(seg[p + 2] >> 4), u32::from(seg[p + 2] & 15));
    if !f.progressive && (ss != 0 || se != 63 || ah != 0 || al != 0) {
        return Err(bad());
    }
    if se > 63 || ss > se || (f.progressive && ss == 0 && se != 0) || (ss > 0 && n != 1) || al > 13 {
        return Err(bad());
    }
    Ok(Scan { comps, ss, se, ah, al })
}

type Tables<'a> = (&'a [Option<Huffman>; 4], &'a [Option<Huffman>; 4]);

/// Decodes one scan's entropy-coded data into the frame's coefficients;
/// returns the position of the marker after it.
fn decode_scan(bytes: &[u8], start: usize, f: &mut Frame, scan: &Scan, tables: Tables, restart: usize) -> Res<usize> {
    let mut bits = Bits::new(bytes, start);
    for &ci in &scan.comps {
        f.comps[ci].dc_pred = 0;
    }
    let mut eobrun = 0u32;
    let single = scan.comps.len() == 1;
    let (units_x, units_y) = if single {
        let c = &f.comps[scan.comps[0]];
        ((f.width * c.h).div_ceil(f.hmax).div_ceil(8), (f.height * c.v).div_ceil(f.vmax).div_ceil(8))
    } else {
        (f.mcux, f.mcuy)
    };
    let total = units_x * units_y;
    for unit in 0..total {
        if restart > 0 && unit > 0 && unit % restart == 0 {
            bits.restart()?;
            eobrun = 0;
            for &ci in &scan.comps {
                f.comps[ci].dc_pred = 0;
            }
        }
        let (ux, uy) = (unit % units_x, unit / units_x);
        if single {
            decode_block(&mut bits, f, scan, scan.comps[0], ux, uy, tables, &mut eobrun)?;
        } else {
            for &ci in &scan.comps {
                let (h, v) = (f.comps[ci].h, f.comps[ci].v);
                for by in 0..v {
                    for bx in 0..h {
                        decode_block(&mut bits, f, scan, ci, ux * h + bx, uy * v + by, tables, &mut eobrun)?;
                    }
                }
            }
        }
    }
    // Find the next marker after the scan data.
    let mut pos = bits.pos.min(bytes.len());
    if !bits.hit_marker {
        pos = pos.saturating_sub((bits.nbits / 8) as usize);
    }
    while pos + 1 < bytes.len()
        && !(bytes[pos] == 0xFF && bytes[pos + 1] != 0 && !(0xD0..=0xD7).contains(&bytes[pos + 1]))
    {
        pos += 1;
    }
    if pos + 1 >= bytes.len() {
        return Err(Corrupt("truncated: the data ends inside a scan".into()));
    }
    Ok(pos)
}

#[allow(clippy::too_many_arguments)]
fn decode_block(
    bits: &mut Bits,
    f: &mut Frame,
    scan: &Scan,
    ci: usize,
    bx: usize,
    by: usize,
    (dc, ac): Tables,
    eobrun: &mut u32,
) -> Res<()> {
    let c = &mut f.comps[ci];
    let off = (by * c.bw + bx) * 64;
    let block = c.coefs.get_mut(off..off + 64).ok_or_else(|| Corrupt("block outside the image".into()))?;
    let no_table = || Corrupt("scan uses an undefined Huffman table".into());
    if !f.progressive {
        let dct = dc.get(c.dc_table).and_then(Option::as_ref).ok_or_else(no_table)?;
        let act = ac.get(c.ac_table).and_then(Option::as_ref).ok_or_else(no_table)?;
        let s = dc_size(bits.decode(dct)?)?;
        c.dc_pred = c.dc_pred.wrapping_add(bits.receive_extend(s));
        block[0] = c.dc_pred as i16;
        let mut k = 1;
        while k < 64 {
            let rs = bits.decode(act)?;
            let (r, s) = (usize::from(rs >> 4), u32::from(rs & 15));
            if s == 0 {
                if r != 15 {
                    break;
                }
                k += 16;
                continue;
            }
            k += r;
            if k > 63 {
                return Err(Corrupt("AC coefficient index out of range".into()));
            }
            block[ZIGZAG[k]] = bits.receive_extend(s) as i16;
            k += 1;
        }
        return Ok(());
    }
    if scan.ss == 0 {
        // DC scans of progressive JPEGs.
        if scan.ah == 0 {
            let dct = dc.get(c.dc_table).and_then(Option::as_ref).ok_or_else(no_table)?;
            let s = dc_size(bits.decode(dct)?)?;
            c.dc_pred = c.dc_pred.wrapping_add(bits.receive_extend(s));
            block[0] = c.dc_pred.wrapping_shl(scan.al) as i16;
        } else if bits.bit() == 1 {
            block[0] |= 1 << scan.al;
        }
        return Ok(());
    }
    let act = ac.get(c.ac_table).and_then(Option::as_ref).ok_or_else(no_table)?;
    if scan.ah == 0 {
        ac_first(bits, act, block, scan, eobrun)
    } else {
        ac_refine(bits, act, block, scan, eobrun)
    }
}

/// A DC difference category: at most 16 bits follow.
fn dc_size(symbol: u8) -> Res<u32> {
    if symbol > 16 {
        return Err(Corrupt(format!("bad DC difference size {symbol}")));
    }
    Ok(u32::from(symbol))
}

fn ac_first(bits: &mut Bits, act: &Huffman, block: &mut [i16], scan: &Scan, eobrun: &mut u32) -> Res<()> {
    if *eobrun > 0 {
        *eobrun -= 1;
        return Ok(());
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let rs = bits.decode(act)?;
        let (r, s) = (u32::from(rs >> 4), u32::from(rs & 15));
        if s == 0 {
            if r < 15 {
                *eobrun = (1 << r) - 1 + bits.bits(r);
                break;
            }
            k += 16;
            continue;
        }
        k += r as usize;
        if k > 63 {
            return Err(Corrupt("AC coefficient index out of range".into()));
        }
        block[ZIGZAG[k]] = (bits.receive_extend(s) * (1 << scan.al)) as i16;
        k += 1;
    }
    Ok(())
}

/// Successive approximation refinement of AC coefficients (ITU T.81 G.1.2.3).
fn ac_refine(bits: &mut Bits, act: &Huffman, block: &mut [i16], scan: &Scan, eobrun: &mut u32) -> Res<()> {
    let p1 = 1i16 << scan.al;
    let m1 = -1i16 << scan.al;
    let mut k = scan.ss;
    let refine = |bits: &mut Bits, coef: &mut i16| {
        if bits.bit() == 1 && (*coef & p1) == 0 {
            *coef = if *coef >= 0 { coef.wrapping_add(p1) } else { coef.wrapping_add(m1) };
        }
    };
    if *eobrun == 0 {
        while k <= scan.se {
            let rs = bits.decode(act)?;
            let (mut r, s) = (i32::from(rs >> 4), u32::from(rs & 15));
            let mut value = 0i16;
            if s == 0 {
                if r < 15 {
                    *eobrun = (1 << r) + bits.bits(r as u32);
                    break;
                }
            } else {
                if s != 1 {
                    return Err(Corrupt("bad refinement code".into()));
                }
                value = if bits.bit() == 1 { p1 } else { m1 };
            }
            while k <= scan.se {
                let coef = &mut block[ZIGZAG[k]];
                if *coef != 0 {
                    refine(bits, coef);
                } else {
                    if r == 0 {
                        if value != 0 {
                            *coef = value;
                        }
                        k += 1;
                        break;
                    }
                    r -= 1;
                }
                k += 1;
            }
        }
    }
    if *eobrun > 0 {
        while k <= scan.se {
            let coef = &mut block[ZIGZAG[k]];
            if *coef != 0 {
                refine(bits, coef);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
    Ok(())
}

// ----- reconstruction -------------------------------------------------------------------

const CONST_BITS: i32 = 13;
const PASS1_BITS: i32 = 2;

fn descale(x: i64, n: i32) -> i64 {
    (x + (1 << (n - 1))) >> n
}

/// libjpeg's post-IDCT range limit: the value wraps into [-512, 512) (so
/// wildly out-of-range results of corrupt data land where libjpeg's table puts
/// them), is offset by 128 and clamped to a sample.
fn range_limit(x: i64) -> u8 {
    let wrapped = ((x + 512) & 1023) - 512;
    (wrapped + 128).clamp(0, 255) as u8
}

/// The "islow" IDCT of one dequantised block into 8×8 samples at `out[row * stride + col]`.
fn idct_islow(coef: &[i16], q: &[u16; 64], out: &mut [u8], stride: usize) {
    let mut ws = [0i32; 64];
    for col in 0..8 {
        let c = |r: usize| i64::from(coef[r * 8 + col]) * i64::from(q[r * 8 + col]);
        if (1..8).all(|r| coef[r * 8 + col] == 0) {
            let dc = (c(0) << PASS1_BITS) as i32;
            for r in 0..8 {
                ws[r * 8 + col] = dc;
            }
            continue;
        }
        let o = butterfly([c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7)]);
        for r in 0..8 {
            ws[r * 8 + col] = descale(o[r], CONST_BITS - PASS1_BITS) as i32;
        }
    }
    for row in 0..8 {
        let w = &ws[row * 8..row * 8 + 8];
        let dst = &mut out[row * stride..row * stride + 8];
        if w[1..].iter().all(|&v| v == 0) {
            dst.fill(range_limit(descale(i64::from(w[0]), PASS1_BITS + 3)));
            continue;
        }
        let o = butterfly([0, 1, 2, 3, 4, 5, 6, 7].map(|i| i64::from(w[i])));
        for (d, v) in dst.iter_mut().zip(o) {
            *d = range_limit(descale(v, CONST_BITS + PASS1_BITS + 3));
        }
    }
}

/// One 1-D pass of the LL&M IDCT as libjpeg's jidctint.c computes it; returns
/// the eight outputs before descaling (scaled by 2^CONST_BITS).
fn butterfly(x: [i64; 8]) -> [i64; 8] {
    const F_0_298: i64 = 2446;
    const F_0_390: i64 = 3196;
    const F_0_541: i64 = 4433;
    const F_0_765: i64 = 6270;
    const F_0_899: i64 = 7373;
    const F_1_175: i64 = 9633;
    const F_1_501: i64 = 12299;
    const F_1_847: i64 = 15137;
    const F_1_961: i64 = 16069;
    const F_2_053: i64 = 16819;
    const F_2_562: i64 = 20995;
    const F_3_072: i64 = 25172;
    // Even part.
    let (z2, z3) = (x[2], x[6]);
    let z1 = (z2 + z3) * F_0_541;
    let tmp2 = z1 + z3 * -F_1_847;
    let tmp3 = z1 + z2 * F_0_765;
    let tmp0 = (x[0] + x[4]) << CONST_BITS;
    let tmp1 = (x[0] - x[4]) << CONST_BITS;
    let (tmp10, tmp13, tmp11, tmp12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
    // Odd part.
    let (mut t0, mut t1, mut t2, mut t3) = (x[7], x[5], x[3], x[1]);
    let (mut z1, mut z2, mut z3, mut z4) = (t0 + t3, t1 + t2, t0 + t2, t1 + t3);
    let z5 = (z3 + z4) * F_1_175;
    t0 *= F_0_298;
    t1 *= F_2_053;
    t2 *= F_3_072;
    t3 *= F_1_501;
    z1 *= -F_0_899;
    z2 *= -F_2_562;
    z3 *= -F_1_961;
    z4 *= -F_0_390;
    z3 += z5;
    z4 += z5;
    t0 += z1 + z3;
    t1 += z2 + z4;
    t2 += z2 + z3;
    t3 += z1 + z4;
    [tmp10 + t3, tmp11 + t2, tmp12 + t1, tmp13 + t0, tmp13 - t0, tmp12 - t1, tmp11 - t2, tmp10 - t3]
}

/// A component's samples after the IDCT: `width × height` valid of a padded plane.
struct Plane {
    stride: usize,
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Plane {
    fn at(&self, x: usize, y: usize) -> i32 {
        i32::from(self.data[y * self.stride + x])
    }
}

fn finish(f: Frame, qt: &[[u16; 64]; 4], jfif: bool, adobe: Option<u8>) -> Res<Decoded> {
    let planes: Vec<Plane> = f
        .comps
        .iter()
        .map(|c| {
            let stride = c.bw * 8;
            let mut data = vec![0u8; stride * c.bh * 8];
            for by in 0..c.bh {
                for bx in 0..c.bw {
                    let off = (by * c.bw + bx) * 64;
                    let out = &mut data[by * 8 * stride + bx * 8..];
                    idct_islow(&c.coefs[off..off + 64], &qt[c.tq], out, stride);
                }
            }
            Plane { stride, width: (f.width * c.h).div_ceil(f.hmax), height: (f.height * c.v).div_ceil(f.vmax), data }
        })
        .collect();
    if planes.len() == 1 {
        let p = &planes[0];
        let mut data = Vec::with_capacity(f.width * f.height);
        for y in 0..f.height {
            data.extend_from_slice(&p.data[y * p.stride..y * p.stride + f.width]);
        }
        return Ok(Decoded { width: f.width, height: f.height, channels: 1, data });
    }
    let full: Vec<Vec<u8>> = f
        .comps
        .iter()
        .zip(&planes)
        .map(|(c, p)| {
            upsample(p, f.hmax / c.h, f.vmax / c.v, f.hmax % c.h == 0 && f.vmax % c.v == 0, f.width, f.height)
        })
        .collect::<Res<_>>()?;
    let ids: Vec<u8> = f.comps.iter().map(|c| c.id).collect();
    let is_rgb = match adobe {
        _ if jfif => false,
        Some(t) => t == 0,
        None => ids == [b'R', b'G', b'B'],
    };
    let mut data = vec![0u8; f.width * f.height * 3];
    if is_rgb {
        for (i, px) in data.chunks_exact_mut(3).enumerate() {
            px.copy_from_slice(&[full[0][i], full[1][i], full[2][i]]);
        }
    } else {
        ycc_to_rgb(&full, &mut data);
    }
    Ok(Decoded { width: f.width, height: f.height, channels: 3, data })
}

/// Upsamples a component to the full image size as libjpeg-turbo does by
/// default: triangle ("fancy") filters for 2:1 horizontal, vertical or both
/// (when the component is wider than 2 samples), box replication otherwise.
fn upsample(p: &Plane, hs: usize, vs: usize, integral: bool, width: usize, height: usize) -> Res<Vec<u8>> {
    if !integral || hs == 0 || vs == 0 {
        return Err(Unsupported("non-integral chroma sampling ratio".into()));
    }
    let mut out = vec![0u8; width * height];
    let fancy_h = hs == 2 && p.width > 2;
    for y in 0..height {
        let row = &mut out[y * width..(y + 1) * width];
        match (hs, vs) {
            (1, 1) => {
                for (x, o) in row.iter_mut().enumerate() {
                    *o = p.at(x, y) as u8;
                }
            }
            (2, 1) if fancy_h => h2v1_fancy(p, y, row),
            (2, 2) if fancy_h => h2v2_fancy(p, y, row),
            (1, 2) => h1v2_fancy(p, y, row),
            _ => {
                for (x, o) in row.iter_mut().enumerate() {
                    *o = p.at(x / hs, y / vs) as u8;
                }
            }
        }
    }
    Ok(out)
}

fn h2v1_fancy(p: &Plane, y: usize, row: &mut [u8]) {
    let last = p.width - 1;
    let s = |x: usize| p.at(x, y);
    for (ox, o) in row.iter_mut().enumerate() {
        let c = ox / 2;
        *o = if ox % 2 == 0 {
            if c == 0 {
                s(0)
            } else {
                (3 * s(c) + s(c - 1) + 1) >> 2
            }
        } else if c == last {
            s(last)
        } else {
            (3 * s(c) + s(c + 1) + 2) >> 2
        } as u8;
    }
}

/// The row a 2:1 vertical filter blends with: the one above for even output
/// rows, below for odd ones, the edge row repeated at the top and bottom.
fn far_row(p: &Plane, y: usize) -> (usize, usize) {
    let near = y / 2;
    let far = if y % 2 == 0 { near.saturating_sub(1) } else { (near + 1).min(p.height - 1) };
    (near, far)
}

fn h1v2_fancy(p: &Plane, y: usize, row: &mut [u8]) {
    let (near, far) = far_row(p, y);
    let bias = if y % 2 == 0 { 1 } else { 2 };
    for (x, o) in row.iter_mut().enumerate() {
        *o = ((3 * p.at(x, near) + p.at(x, far) + bias) >> 2) as u8;
    }
}

fn h2v2_fancy(p: &Plane, y: usize, row: &mut [u8]) {
    let (near, far) = far_row(p, y);
    let last = p.width - 1;
    let col = |x: usize| 3 * p.at(x, near) + p.at(x, far);
    for (ox, o) in row.iter_mut().enumerate() {
        let c = ox / 2;
        let this = col(c);
        *o = if ox % 2 == 0 {
            if c == 0 {
                (this * 4 + 8) >> 4
            } else {
                (this * 3 + col(c - 1) + 8) >> 4
            }
        } else if c == last {
            (this * 4 + 7) >> 4
        } else {
            (this * 3 + col(c + 1) + 7) >> 4
        } as u8;
    }
}

/// libjpeg's YCbCr→RGB: 16-bit fixed-point tables, rounding as jdcolor.c.
fn ycc_to_rgb(planes: &[Vec<u8>], out: &mut [u8]) {
    const SCALEBITS: i64 = 16;
    const ONE_HALF: i64 = 1 << (SCALEBITS - 1);
    let fix = |v: f64| (v * (1i64 << SCALEBITS) as f64 + 0.5) as i64;
    let mut cr_r = [0i32; 256];
    let mut cb_b = [0i32; 256];
    let mut cr_g = [0i64; 256];
    let mut cb_g = [0i64; 256];
    for i in 0..256 {
        let x = i as i64 - 128;
        cr_r[i] = ((fix(1.402) * x + ONE_HALF) >> SCALEBITS) as i32;
        cb_b[i] = ((fix(1.772) * x + ONE_HALF) >> SCALEBITS) as i32;
        cr_g[i] = -fix(0.71414) * x;
        cb_g[i] = -fix(0.34414) * x + ONE_HALF;
    }
    let clamp = |v: i32| v.clamp(0, 255) as u8;
    for (i, px) in out.chunks_exact_mut(3).enumerate() {
        let y = i32::from(planes[0][i]);
        let (cb, cr) = (usize::from(planes[1][i]), usize::from(planes[2][i]));
        px[0] = clamp(y + cr_r[cr]);
        px[1] = clamp(y + ((cb_g[cb] + cr_g[cr]) >> SCALEBITS) as i32);
        px[2] = clamp(y + cb_b[cb]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_limit_matches_libjpegs_table() {
        // The table's layout: [0,127] → +128, [128,511] → 255, [512,895] → 0, [896,1023] → −896.
        for idx in 0..1024i64 {
            let want = match idx {
                0..=127 => idx + 128,
                128..=511 => 255,
                512..=895 => 0,
                _ => idx - 896,
            };
            assert_eq!(i64::from(range_limit(idx)), want, "index {idx}");
            assert_eq!(range_limit(idx + 1024 * 3), range_limit(idx), "wraps with & 1023");
            assert_eq!(range_limit(idx - 1024 * 5), range_limit(idx));
        }
    }

    #[test]
    fn a_dc_only_block_is_flat() {
        let mut coef = [0i16; 64];
        coef[0] = 10;
        let mut q = [1u16; 64];
        q[0] = 8;
        let mut out = [0u8; 64];
        idct_islow(&coef, &q, &mut out, 8);
        // DC 80 → 80/8 = 10 above mid-grey.
        assert!(out.iter().all(|&v| v == 138), "{out:?}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\xFF\xD8",
            b"\xFF\xD8\xFF\xC0\x00\x02",
            b"\xFF\xD8\xFF\xDA\x00\x08\x01\x01\x00\x00\x3F\x00",
            b"hello",
        ] {
            assert!(decode(bytes).is_err());
        }
    }
}
