//! The CLIP byte-level BPE tokenizer, as Stable Diffusion checkpoints ship it
//! (`tokenizer/vocab.json` + `merges.txt`, or `tokenizer.json`).
//!
//! With `vocab.json` + `merges.txt` the text goes through the cleaning of OpenAI's
//! reference tokenizer before the BPE: the text fixes of ftfy's `fix_text` that do
//! not need its mojibake detector (HTML entities, C1 controls read as Windows-1252,
//! Latin ligatures, full/half-width forms, curly quotes, line breaks, terminal escapes,
//! control characters, NFC), then HTML unescaping twice, whitespace collapse,
//! stripping and lower-casing. The text is split with CLIP's pattern and each piece
//! is byte-encoded and merged by the BPE model of the `tokenizers` crate, with `</w>`
//! marking the end of a word. ftfy's repair of mis-decoded UTF-8 (mojibake such as
//! "cafÃ©") is not reproduced.
//!
//! With only `tokenizer.json` the `tokenizers` pipeline it describes is used as is
//! (for SD checkpoints: NFC, whitespace collapse and lower-casing, no ftfy or HTML
//! unescaping).
//!
//! Sequences are laid out as SD pipelines do: `[BOS] + ids[..75] + [EOS]`, padded to
//! 77 with end-of-text (SD1.x / SDXL `tokenizer`) or with id 0, `"!"` (SD2 / SDXL
//! `tokenizer_2`).

use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::Tensor;
use tokenizers::models::bpe::BPE;
use tokenizers::utils::SysRegex;
use tokenizers::Model;

/// `<|startoftext|>`.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// `<|endoftext|>`.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Sequence length of the SD text encoders.
pub const MAX_LENGTH: usize = 77;

/// CLIP's pre-tokenization pattern (special tokens, contractions, letter runs,
/// single digits, runs of other non-space characters).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// How to pad rows to [`MAX_LENGTH`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pad {
    /// With `<|endoftext|>` (SD1.x, SDXL `tokenizer`).
    Eos,
    /// With id 0, `"!"` (SD2, SDXL `tokenizer_2`).
    Zero,
    /// With the folder's configured `pad_token`.
    Config,
}

impl Pad {
    /// Parse `eos`, `zero` or `config`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "eos" => Pad::Eos,
            "zero" => Pad::Zero,
            "config" | "auto" => Pad::Config,
            other => bail!("unknown padding {other:?} (expected eos, zero or config)"),
        })
    }
}

/// vocab.json + merges.txt with the reference cleaning.
struct ReferenceBpe {
    bpe: BPE,
    split: SysRegex,
    byte_encoder: [char; 256],
}

enum Backend {
    Reference(Box<ReferenceBpe>),
    /// tokenizer.json, run by the `tokenizers` crate as it describes itself.
    Json(Box<tokenizers::Tokenizer>),
}

/// The CLIP tokenizer of an SD checkpoint folder.
pub struct ClipTokenizer {
    backend: Backend,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
    /// A configured pad token other than BOS / EOS (`"!"` of the SDXL and SD3
    /// `tokenizer_2`): transformers registers it as a special token, so it is matched
    /// in the text before BPE (`"cat!"` -> `cat</w>`, `!` = id 0), as are BOS and EOS.
    special_pad: Option<String>,
    max_length: usize,
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_encoder() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("byte range")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("byte range")
        };
    }
    table
}

/// The `pad_token` of `tokenizer_config.json` or `special_tokens_map.json` (a string
/// or an `{"content": ...}` object), if any.
fn configured_pad_token(dir: &Path) -> Result<Option<String>> {
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(name);
        if !p.is_file() {
            continue;
        }
        let v = crate::models::config::read_json(&p)?;
        match v.get("pad_token") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Object(o)) => {
                if let Some(serde_json::Value::String(s)) = o.get("content") {
                    return Ok(Some(s.clone()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

fn configured_max_length(dir: &Path) -> Result<usize> {
    let p = dir.join("tokenizer_config.json");
    if p.is_file() {
        let v = crate::models::config::read_json(&p)?;
        if let Some(n) = v.get("model_max_length").and_then(|n| n.as_u64()) {
            if (3..=MAX_LENGTH as u64).contains(&n) {
                return Ok(n as usize);
            }
        }
    }
    Ok(MAX_LENGTH)
}

impl ClipTokenizer {
    /// Load a tokenizer folder (e.g. `<checkpoint>/tokenizer_2`). `vocab.json` +
    /// `merges.txt` are preferred (exact reference behaviour); `tokenizer.json` is the
    /// fallback.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let json = dir.join("tokenizer.json");
        let (backend, vocab_map): (Backend, HashMap<String, u32>) = if vocab.is_file()
            && merges.is_file()
        {
            let bpe = BPE::from_file(&path_str(&vocab)?, &path_str(&merges)?)
                .end_of_word_suffix("</w>".to_string())
                .unk_token(EOS_TOKEN.to_string())
                .build()
                .map_err(|e| {
                    anyhow!(
                        "{}: cannot build the BPE from vocab.json + merges.txt: {e}",
                        dir.display()
                    )
                })?;
            let vocab_map = bpe.get_vocab();
            let split =
                SysRegex::new(SPLIT_PATTERN).map_err(|e| anyhow!("CLIP split pattern: {e}"))?;
            (
                Backend::Reference(Box::new(ReferenceBpe {
                    bpe,
                    split,
                    byte_encoder: byte_encoder(),
                })),
                vocab_map,
            )
        } else if json.is_file() {
            let tok = tokenizers::Tokenizer::from_file(&json)
                .map_err(|e| anyhow!("{}: cannot load: {e}", json.display()))?;
            let vocab_map = tok.get_vocab(true);
            (Backend::Json(Box::new(tok)), vocab_map)
        } else {
            bail!(
                "{}: no CLIP tokenizer found (looked for vocab.json + merges.txt, or tokenizer.json)",
                dir.display()
            );
        };
        let id = |tok: &str, what: &str| -> Result<i64> {
            vocab_map.get(tok).copied().map(i64::from).with_context(|| {
                format!(
                    "{}: the vocabulary has no {what} token {tok:?}",
                    dir.display()
                )
            })
        };
        let bos_id = id(BOS_TOKEN, "start-of-text")?;
        let eos_id = id(EOS_TOKEN, "end-of-text")?;
        let pad_token = configured_pad_token(dir)?;
        let pad_id = match &pad_token {
            Some(t) => id(t, "pad_token")?,
            None => eos_id,
        };
        let special_pad = pad_token.filter(|t| t != BOS_TOKEN && t != EOS_TOKEN && !t.is_empty());
        Ok(ClipTokenizer {
            backend,
            bos_id,
            eos_id,
            pad_id,
            special_pad,
            max_length: configured_max_length(dir)?,
        })
    }

    /// The same tokenizer with `token` (in the vocabulary) as its configured pad token,
    /// as a `tokenizer_config.json` naming it would give (special-token matching
    /// included, see the field `special_pad`).
    pub fn with_pad_token(mut self, token: &str) -> Result<Self> {
        let id = match &self.backend {
            Backend::Reference(r) => r.bpe.get_vocab().get(token).copied(),
            Backend::Json(t) => t.token_to_id(token),
        }
        .with_context(|| format!("CLIP tokenizer: the vocabulary has no pad token {token:?}"))?;
        self.pad_id = i64::from(id);
        self.special_pad = (token != BOS_TOKEN && token != EOS_TOKEN).then(|| token.to_string());
        Ok(self)
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    /// Row length of [`ClipTokenizer::encode_padded`] (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The padding id for `pad`.
    pub fn pad_id(&self, pad: Pad) -> i64 {
        match pad {
            Pad::Eos => self.eos_id,
            Pad::Zero => 0,
            Pad::Config => self.pad_id,
        }
    }

    /// Token ids of `text` without BOS / EOS and without truncation.
    pub fn encode_content(&self, text: &str) -> Result<Vec<i64>> {
        match &self.backend {
            Backend::Reference(r) => {
                let ReferenceBpe {
                    bpe,
                    split,
                    byte_encoder,
                } = r.as_ref();
                let cleaned = clean_text(text);
                let mut ids = Vec::new();
                // Segments between occurrences of the special pad token (if any).
                let segments: Vec<&str> = match &self.special_pad {
                    Some(sp) => cleaned.split(sp.as_str()).collect(),
                    None => vec![cleaned.as_str()],
                };
                for (n, segment) in segments.iter().enumerate() {
                    if n > 0 {
                        ids.push(self.pad_id);
                    }
                    self.bpe_segment(bpe, split, byte_encoder, segment, &mut ids)?;
                }
                Ok(ids)
            }
            Backend::Json(tok) => {
                let enc = tok
                    .encode(text, false)
                    .map_err(|e| anyhow!("tokenizing {text:?}: {e}"))?;
                Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
            }
        }
    }

    /// The reference BPE ids of one stretch of cleaned text (no special pad token in it).
    fn bpe_segment(
        &self,
        bpe: &BPE,
        split: &SysRegex,
        byte_encoder: &[char; 256],
        cleaned: &str,
        ids: &mut Vec<i64>,
    ) -> Result<()> {
        for (start, end) in split.find_iter(cleaned) {
            let piece = &cleaned[start..end];
            if piece == BOS_TOKEN {
                ids.push(self.bos_id);
                continue;
            }
            if piece == EOS_TOKEN {
                ids.push(self.eos_id);
                continue;
            }
            let encoded: String = piece.bytes().map(|b| byte_encoder[b as usize]).collect();
            let tokens = bpe
                .tokenize(&encoded)
                .map_err(|e| anyhow!("BPE failed on {piece:?}: {e}"))?;
            ids.extend(tokens.iter().map(|t| i64::from(t.id)));
        }
        Ok(())
    }

    /// `[BOS] + ids + [EOS]`, unpadded and not truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let mut ids = vec![self.bos_id];
        ids.extend(self.encode_content(text)?);
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// One row of [`MAX_LENGTH`]: `[BOS] + ids[..75] + [EOS]` then padding; the flag
    /// says whether tokens were cut.
    pub fn encode_row(&self, text: &str, pad: Pad) -> Result<(Vec<i64>, bool)> {
        let mut content = self.encode_content(text)?;
        let keep = self.max_length - 2;
        let truncated = content.len() > keep;
        content.truncate(keep);
        let mut row = Vec::with_capacity(self.max_length);
        row.push(self.bos_id);
        row.extend(content);
        row.push(self.eos_id);
        row.resize(self.max_length, self.pad_id(pad));
        Ok((row, truncated))
    }

    /// A batch of rows as an int64 tensor [B, 77], with the number of captions that
    /// were truncated.
    pub fn encode_padded(&self, texts: &[&str], pad: Pad) -> Result<(Tensor, usize)> {
        let mut flat = Vec::with_capacity(texts.len() * self.max_length);
        let mut truncated = 0;
        for t in texts {
            let (row, cut) = self.encode_row(t, pad)?;
            flat.extend(row);
            truncated += usize::from(cut);
        }
        let t = Tensor::from_slice(&flat).view([texts.len() as i64, self.max_length as i64]);
        Ok((t, truncated))
    }
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(String::from)
        .with_context(|| format!("path {} is not valid UTF-8", p.display()))
}

/// `adt tokenize`: the ids of each text. `pad` None gives `[BOS] + ids + [EOS]`
/// unpadded and untruncated; `eos`, `zero` or `config` give 77-long rows.
pub fn run_tokenize(
    tokenizer_dir: &Path,
    pad: Option<&str>,
    texts: &[String],
) -> Result<Vec<Vec<i64>>> {
    let tok = ClipTokenizer::from_dir(tokenizer_dir)?;
    let pad = pad.map(Pad::parse).transpose()?;
    texts
        .iter()
        .map(|t| match pad {
            None => tok.encode(t),
            Some(p) => tok.encode_row(t, p).map(|(row, _)| row),
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Text cleaning of the reference tokenizer.

/// The reference cleaning: ftfy's text fixes, HTML unescaping twice, whitespace
/// collapse, strip, lower-case.
pub fn clean_text(text: &str) -> String {
    let t = fix_text(text);
    let t = html_unescape(&html_unescape(&t));
    collapse_whitespace(&t).to_lowercase()
}

/// Python's `str.isspace` (Unicode White_Space plus the ASCII separators 0x1c..0x1f).
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Runs of whitespace become one space; leading / trailing whitespace is removed.
fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if py_isspace(c) {
            pending_space = true;
        } else {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.push(c);
        }
    }
    out
}

/// ftfy `fix_text` with its default configuration, minus the mojibake repair:
/// line by line, fixes repeated until nothing changes; HTML entities are decoded only
/// until a line containing '<' is seen.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        let mut cur = segment.to_string();
        loop {
            let next = fix_segment_once(&cur, unescape);
            if next == cur {
                break;
            }
            cur = next;
        }
        out.push_str(&cur);
    }
    out
}

fn fix_segment_once(text: &str, unescape: bool) -> String {
    let mut t = if unescape {
        ftfy_unescape_html(text)
    } else {
        text.to_string()
    };
    t = t
        .chars()
        .map(|c| {
            if ('\u{80}'..='\u{9f}').contains(&c) {
                cp1252(c as u32)
            } else {
                c
            }
        })
        .collect();
    t = t.chars().fold(String::with_capacity(t.len()), |mut s, c| {
        match ligature(c) {
            Some(r) => s.push_str(r),
            None => match width_map().get(&c) {
                Some(r) => s.push_str(r),
                None => s.push(c),
            },
        }
        s
    });
    t = t
        .chars()
        .map(|c| match c {
            '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
            '\u{201c}'..='\u{201f}' => '"',
            c => c,
        })
        .collect();
    t = t
        .replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n");
    t = remove_terminal_escapes(&t);
    t.retain(|c| !is_control_to_remove(c));
    nfc(&t)
}

fn nfc(text: &str) -> String {
    let mut n = tokenizers::NormalizedString::from(text);
    n.nfc();
    n.get().to_string()
}

/// Windows-1252 reading of a C1 control, leaving the five undefined bytes alone.
fn cp1252(b: u32) -> char {
    const HIGH: [u32; 32] = [
        0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039,
        0x152, 0x8d, 0x17d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014,
        0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d, 0x17e, 0x178,
    ];
    char::from_u32(HIGH[(b - 0x80) as usize]).expect("valid code point")
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// Full-width and half-width forms (U+FF01..U+FFEF) to their NFKC forms, and the
/// ideographic space to a space.
fn width_map() -> &'static HashMap<char, String> {
    static MAP: OnceLock<HashMap<char, String>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut m = HashMap::new();
        m.insert('\u{3000}', " ".to_string());
        for cp in 0xff01..0xfff0u32 {
            if let Some(c) = char::from_u32(cp) {
                let mut n = tokenizers::NormalizedString::from(c.to_string().as_str());
                n.nfkc();
                if n.get() != c.to_string() {
                    m.insert(c, n.get().to_string());
                }
            }
        }
        m
    })
}

/// Remove `ESC [ digits/semicolons letter` sequences.
fn remove_terminal_escapes(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\u{1b}' && chars.get(i + 1) == Some(&'[') {
            let mut j = i + 2;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == ';') {
                j += 1;
            }
            if j < chars.len() && chars[j].is_ascii_alphabetic() {
                i = j + 1;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn is_control_to_remove(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0x206a..=0x206f | 0xfeff | 0xfff9..=0xfffc)
}

// ---------------------------------------------------------------------------------
// HTML character references.

/// HTML 4 entity names (and `apos`), with their characters; `*` marks the names
/// HTML5 also accepts without the closing semicolon.
const ENTITIES: &str = "
AElig*=c6 AMP*=26 Aacute*=c1 Acirc*=c2 Agrave*=c0 Alpha=391 Aring*=c5 Atilde*=c3
Auml*=c4 Beta=392 COPY*=a9 Ccedil*=c7 Chi=3a7 Dagger=2021 Delta=394 ETH*=d0 Eacute*=c9
Ecirc*=ca Egrave*=c8 Epsilon=395 Eta=397 Euml*=cb GT*=3e Gamma=393 Iacute*=cd Icirc*=ce
Igrave*=cc Iota=399 Iuml*=cf Kappa=39a LT*=3c Lambda=39b Mu=39c Ntilde*=d1 Nu=39d
OElig=152 Oacute*=d3 Ocirc*=d4 Ograve*=d2 Omega=3a9 Omicron=39f Oslash*=d8 Otilde*=d5
Ouml*=d6 Phi=3a6 Pi=3a0 Prime=2033 Psi=3a8 QUOT*=22 REG*=ae Rho=3a1 Scaron=160 Sigma=3a3
THORN*=de Tau=3a4 Theta=398 Uacute*=da Ucirc*=db Ugrave*=d9 Upsilon=3a5 Uuml*=dc Xi=39e
Yacute*=dd Yuml=178 Zeta=396 aacute*=e1 acirc*=e2 acute*=b4 aelig*=e6 agrave*=e0
alefsym=2135 alpha=3b1 amp*=26 and=2227 ang=2220 apos=27 aring*=e5 asymp=2248 atilde*=e3
auml*=e4 bdquo=201e beta=3b2 brvbar*=a6 bull=2022 cap=2229 ccedil*=e7 cedil*=b8 cent*=a2
chi=3c7 circ=2c6 clubs=2663 cong=2245 copy*=a9 crarr=21b5 cup=222a curren*=a4 dArr=21d3
dagger=2020 darr=2193 deg*=b0 delta=3b4 diams=2666 divide*=f7 eacute*=e9 ecirc*=ea
egrave*=e8 empty=2205 emsp=2003 ensp=2002 epsilon=3b5 equiv=2261 eta=3b7 eth*=f0
euml*=eb euro=20ac exist=2203 fnof=192 forall=2200 frac12*=bd frac14*=bc frac34*=be
frasl=2044 gamma=3b3 ge=2265 gt*=3e hArr=21d4 harr=2194 hearts=2665 hellip=2026
iacute*=ed icirc*=ee iexcl*=a1 igrave*=ec image=2111 infin=221e int=222b iota=3b9
iquest*=bf isin=2208 iuml*=ef kappa=3ba lArr=21d0 lambda=3bb lang=27e8 laquo*=ab
larr=2190 lceil=2308 ldquo=201c le=2264 lfloor=230a lowast=2217 loz=25ca lrm=200e
lsaquo=2039 lsquo=2018 lt*=3c macr*=af mdash=2014 micro*=b5 middot*=b7 minus=2212 mu=3bc
nabla=2207 nbsp*=a0 ndash=2013 ne=2260 ni=220b not*=ac notin=2209 nsub=2284 ntilde*=f1
nu=3bd oacute*=f3 ocirc*=f4 oelig=153 ograve*=f2 oline=203e omega=3c9 omicron=3bf
oplus=2295 or=2228 ordf*=aa ordm*=ba oslash*=f8 otilde*=f5 otimes=2297 ouml*=f6 para*=b6
part=2202 permil=2030 perp=22a5 phi=3c6 pi=3c0 piv=3d6 plusmn*=b1 pound*=a3 prime=2032
prod=220f prop=221d psi=3c8 quot*=22 rArr=21d2 radic=221a rang=27e9 raquo*=bb rarr=2192
rceil=2309 rdquo=201d real=211c reg*=ae rfloor=230b rho=3c1 rlm=200f rsaquo=203a
rsquo=2019 sbquo=201a scaron=161 sdot=22c5 sect*=a7 shy*=ad sigma=3c3 sigmaf=3c2
sim=223c spades=2660 sub=2282 sube=2286 sum=2211 sup=2283 sup1*=b9 sup2*=b2 sup3*=b3
supe=2287 szlig*=df tau=3c4 there4=2234 theta=3b8 thetasym=3d1 thinsp=2009 thorn*=fe
tilde=2dc times*=d7 trade=2122 uArr=21d1 uacute*=fa uarr=2191 ucirc*=fb ugrave*=f9
uml*=a8 upsih=3d2 upsilon=3c5 uuml*=fc weierp=2118 xi=3be yacute*=fd yen*=a5 yuml*=ff
zeta=3b6 zwj=200d zwnj=200c";

struct EntityTable {
    /// Name (without '&' and ';') to character.
    by_name: HashMap<&'static str, char>,
    /// Names accepted without ';'.
    legacy: HashMap<&'static str, char>,
}

fn entities() -> &'static EntityTable {
    static TABLE: OnceLock<EntityTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut by_name = HashMap::new();
        let mut legacy = HashMap::new();
        for item in ENTITIES.split_whitespace() {
            let (name, hex) = item.split_once('=').expect("entity table entry");
            let c = char::from_u32(u32::from_str_radix(hex, 16).expect("entity code point"))
                .expect("entity char");
            match name.strip_suffix('*') {
                Some(n) => {
                    by_name.insert(n, c);
                    legacy.insert(n, c);
                }
                None => {
                    by_name.insert(name, c);
                }
            }
        }
        EntityTable { by_name, legacy }
    })
}

/// Python's `html.unescape` handling of a numeric reference.
fn numeric_charref(num: Option<u32>) -> String {
    let Some(n) = num else {
        return "\u{fffd}".to_string();
    };
    match n {
        0x00 => "\u{fffd}".to_string(),
        0x0d => "\r".to_string(),
        0x80..=0x9f => cp1252(n).to_string(),
        0xd800..=0xdfff => "\u{fffd}".to_string(),
        n if n > 0x10ffff => "\u{fffd}".to_string(),
        0x01..=0x08 | 0x0b | 0x0e..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
        n if n & 0xfffe == 0xfffe => String::new(),
        n => char::from_u32(n).map(String::from).unwrap_or_default(),
    }
}

fn parse_num(digits: &str, radix: u32) -> Option<u32> {
    let digits = digits.trim_start_matches('0');
    if digits.len() > 8 {
        return None;
    }
    if digits.is_empty() {
        return Some(0);
    }
    u32::from_str_radix(digits, radix).ok()
}

/// Python's `html.unescape` (numeric references, and named ones from the HTML 4
/// set, including the legacy forms without ';').
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let table = entities();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        // Numeric: &#123;? or &#x1F;?
        if let Some(num) = after.strip_prefix('#') {
            let (hex, body) = match num.strip_prefix(['x', 'X']) {
                Some(b) => (true, b),
                None => (false, num),
            };
            let len = body
                .find(|c: char| {
                    if hex {
                        !c.is_ascii_hexdigit()
                    } else {
                        !c.is_ascii_digit()
                    }
                })
                .unwrap_or(body.len());
            if len > 0 {
                let digits = &body[..len];
                let value = parse_num(digits, if hex { 16 } else { 10 });
                out.push_str(&numeric_charref(value));
                let mut consumed = 1 + usize::from(hex) + len;
                if body[len..].starts_with(';') {
                    consumed += 1;
                }
                rest = &after[consumed..];
                continue;
            }
            out.push('&');
            rest = after;
            continue;
        }
        // Named: up to 32 characters other than \t \n \f space < & # ;, then ';'?
        let name_len = after
            .char_indices()
            .take_while(|(_, c)| !matches!(c, '\t' | '\n' | '\u{c}' | ' ' | '<' | '&' | '#' | ';'))
            .take(32)
            .last()
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        if name_len == 0 {
            out.push('&');
            rest = after;
            continue;
        }
        let name = &after[..name_len];
        let semi = after[name_len..].starts_with(';');
        let consumed = name_len + usize::from(semi);
        if semi {
            if let Some(c) = table.by_name.get(name) {
                out.push(*c);
                rest = &after[consumed..];
                continue;
            }
        } else if let Some(c) = table.legacy.get(name) {
            out.push(*c);
            rest = &after[consumed..];
            continue;
        }
        // Longest legacy prefix (at least two characters), the rest kept as text.
        let matched = name
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= 2)
            .rev()
            .find_map(|i| table.legacy.get(&name[..i]).map(|c| (i, *c)));
        match matched {
            Some((i, c)) => {
                out.push(c);
                out.push_str(&after[i..consumed]);
            }
            None => {
                out.push('&');
                out.push_str(&after[..consumed]);
            }
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// ftfy's HTML step: only `&name;` / `&#num;` forms ending in ';' (at most 24
/// alphanumerics), plus upper-cased names of lower-case entities (`&EACUTE;` -> É).
fn ftfy_unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let table = entities();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let (numeric, body) = match after.strip_prefix('#') {
            Some(b) => (true, b),
            None => (false, after),
        };
        let len = body
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(body.len());
        if len == 0 || len > 24 || !body[len..].starts_with(';') {
            out.push('&');
            rest = after;
            continue;
        }
        let name = &body[..len];
        let whole = &after[..usize::from(numeric) + len + 1];
        let replacement = if numeric {
            let decoded = html_unescape(&format!("&{whole}"));
            (!decoded.contains(';')).then_some(decoded)
        } else if let Some(c) = table.by_name.get(name) {
            Some(c.to_string())
        } else {
            let lower = name.to_ascii_lowercase();
            if name == name.to_ascii_uppercase() {
                table
                    .by_name
                    .get(lower.as_str())
                    .map(|c| c.to_uppercase().collect())
            } else {
                None
            }
        };
        match replacement {
            Some(r) => out.push_str(&r),
            None => {
                out.push('&');
                out.push_str(whole);
            }
        }
        rest = &after[whole.len()..];
    }
    out.push_str(rest);
    out
}

/// The tokenizer that ships in `tests/fixtures` (the real CLIP BPE vocabulary) is used
/// by the random-weight pipelines (tests, `adt bench`, `adt init-pipeline`). It is looked
/// for under the current directory first (a binary run from a checkout other than the
/// one it was built in, e.g. on a GPU machine), then in the source tree it was built from.
pub fn builtin_tokenizer_dir() -> PathBuf {
    let rel = Path::new("tests")
        .join("fixtures")
        .join("tokenizer_clip")
        .join("tokenizer");
    if rel.join("vocab.json").is_file() {
        return rel;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_like_python() {
        assert_eq!(html_unescape("fish &amp; chips"), "fish & chips");
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
        assert_eq!(
            html_unescape("a &lt;b&gt; &quot;c&quot; &#39;d&#x27;"),
            "a <b> \"c\" 'd'"
        );
        assert_eq!(html_unescape("caf&eacute"), "café");
        assert_eq!(html_unescape("&notit;"), "¬it;");
        assert_eq!(
            html_unescape("&unknown; & &#; &#x;"),
            "&unknown; & &#; &#x;"
        );
        assert_eq!(
            html_unescape("&#128; &#0; &#1; &#1114112;"),
            "€ \u{fffd}  \u{fffd}"
        );
        assert_eq!(html_unescape("&nbsp;x"), "\u{a0}x");
    }

    #[test]
    fn ftfy_fixes() {
        assert_eq!(
            fix_text("it\u{2019}s \u{201c}quoted\u{201d}"),
            "it's \"quoted\""
        );
        assert_eq!(
            fix_text("\u{ff2c}\u{ff2f}\u{ff35}\u{ff24}\u{3000}x"),
            "LOUD x"
        );
        assert_eq!(fix_text("\u{fb01}ne"), "fine");
        assert_eq!(
            fix_text("P&EACUTE;REZ &amp;amp; this&not that"),
            "PÉREZ & this&not that"
        );
        assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
        assert_eq!(fix_text("\u{1b}[36;44mblue\u{1b}[0m\u{0}"), "blue");
        assert_eq!(fix_text("a\r\nb\u{2028}c"), "a\nb\nc");
        assert_eq!(fix_text("\u{93}hi\u{94}"), "\"hi\"");
        assert_eq!(fix_text("Cafe\u{301}"), "Café");
    }

    #[test]
    fn cleaning() {
        assert_eq!(
            clean_text("  Multiple \t spaces\nAND lines  "),
            "multiple spaces and lines"
        );
        assert_eq!(clean_text("fish &amp;amp; chips"), "fish & chips");
    }

    #[test]
    fn byte_encoder_is_a_bijection() {
        let t = byte_encoder();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(t[b' ' as usize], 'Ġ');
    }
}
