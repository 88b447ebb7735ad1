//! An independent DKIM verifier for tests, written from RFC 6376
//! (relaxed/relaxed, rsa-sha256, `ring` for the RSA check) and sharing no
//! code with `mail-auth`, which signs: a test that checks our signatures
//! with it cannot pass because signer and verifier share a mistake.
//! [`verify`] checks the first `DKIM-Signature` of a message against the
//! TXT record (`v=DKIM1; k=rsa; p=…`) its domain publishes.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rsa::pkcs1::EncodeRsaPublicKey;
use rsa::pkcs8::DecodePublicKey;

/// A header field: its name as written and the whole field (name, colon,
/// value, folded lines) without the final CRLF.
struct Field<'a> {
    name: &'a str,
    raw: &'a str,
}

/// Splits `message` into header fields and the body (after the empty line).
fn split(message: &[u8]) -> Result<(Vec<Field<'_>>, &[u8]), String> {
    let end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&message[..end + 2]).map_err(|_| "non-UTF-8 header")?;
    let body = &message[end + 4..];
    let mut fields: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    for line in head.split_inclusive("\r\n") {
        if line.starts_with([' ', '\t']) {
            let last = fields.last_mut().ok_or("continuation before any field")?;
            last.1 = at + line.len() - 2;
        } else {
            fields.push((at, at + line.len() - 2));
        }
        at += line.len();
    }
    fields
        .into_iter()
        .map(|(start, end)| {
            let raw = &head[start..end];
            let name = raw.split_once(':').ok_or("field without a colon")?.0;
            Ok(Field { name, raw })
        })
        .collect::<Result<_, String>>()
        .map(|fields| (fields, body))
}

fn is_wsp(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// RFC 6376 §3.4.2: lower-case name, unfold, runs of WSP to one SP, no WSP
/// at the end of the value or around the colon. No trailing CRLF.
pub fn relaxed_header(field: &str) -> String {
    let (name, value) = field.split_once(':').unwrap_or((field, ""));
    let unfolded = value.replace("\r\n", "");
    let mut out = String::new();
    let mut in_wsp = false;
    for c in unfolded.chars() {
        if is_wsp(c) {
            in_wsp = true;
        } else {
            if in_wsp && !out.is_empty() {
                out.push(' ');
            }
            in_wsp = false;
            out.push(c);
        }
    }
    format!(
        "{}:{}",
        name.trim_end_matches(is_wsp).to_ascii_lowercase(),
        out
    )
}

/// RFC 6376 §3.4.4: WSP runs to one SP, no WSP at line ends, no empty lines
/// at the end; a non-empty body ends with CRLF.
pub fn relaxed_body(body: &[u8]) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let text = body.strip_suffix(b"\r\n").unwrap_or(body);
    if !body.is_empty() {
        for line in text.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let mut out = Vec::new();
            let mut in_wsp = false;
            for &b in line {
                if b == b' ' || b == b'\t' {
                    in_wsp = true;
                } else {
                    if in_wsp {
                        out.push(b' ');
                    }
                    in_wsp = false;
                    out.push(b);
                }
            }
            lines.push(out);
        }
    }
    while lines.last().is_some_and(Vec::is_empty) {
        lines.pop();
    }
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(&line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The tags of a DKIM-Signature value, whitespace removed from values.
fn tags(value: &str) -> Vec<(String, String)> {
    value
        .split(';')
        .filter_map(|tag| tag.split_once('='))
        .map(|(k, v)| {
            let v: String = v.chars().filter(|c| !c.is_whitespace()).collect();
            (k.trim().to_string(), v)
        })
        .collect()
}

fn tag<'a>(tags: &'a [(String, String)], name: &str) -> Result<&'a str, String> {
    tags.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .ok_or(format!("no {name}= tag"))
}

/// The RSAPublicKey (PKCS#1 DER) in the `p=` of a DKIM TXT record, which
/// holds a SubjectPublicKeyInfo.
fn public_key_from_txt(txt: &str) -> Result<Vec<u8>, String> {
    let tags = tags(txt);
    let spki = STANDARD
        .decode(tag(&tags, "p")?)
        .map_err(|e| e.to_string())?;
    let key = rsa::PublicKey::from_public_key_der(&spki).map_err(|e| e.to_string())?;
    Ok(key
        .to_pkcs1_der()
        .map_err(|e| e.to_string())?
        .as_bytes()
        .to_vec())
}

/// What the independent verifier learnt from a passing signature.
#[derive(Debug)]
pub struct Verified {
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// `t=`.
    pub timestamp: u64,
    /// `h=`, in order.
    pub signed_headers: Vec<String>,
}

/// Verifies the first DKIM-Signature of `message` against `txt`.
pub fn verify(message: &[u8], txt: &str) -> Result<Verified, String> {
    let (fields, body) = split(message)?;
    let signature = fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("DKIM-Signature"))
        .ok_or("no DKIM-Signature")?;
    let value = signature.raw.split_once(':').ok_or("no colon")?.1;
    let tags = tags(&value.replace("\r\n", ""));
    for (name, expected) in [("v", "1"), ("a", "rsa-sha256"), ("c", "relaxed/relaxed")] {
        let got = tag(&tags, name)?;
        if got != expected {
            return Err(format!("{name}={got}"));
        }
    }

    // Body hash.
    let body_hash = ring::digest::digest(&ring::digest::SHA256, &relaxed_body(body));
    if STANDARD.encode(body_hash.as_ref()) != tag(&tags, "bh")? {
        return Err("body hash mismatch".into());
    }

    // Signed data: the h= fields, each instance taken from the bottom up,
    // then the signature field with b= emptied and no CRLF.
    let signed_headers: Vec<String> = tag(&tags, "h")?.split(':').map(str::to_string).collect();
    let mut used = vec![false; fields.len()];
    let mut data = String::new();
    for name in &signed_headers {
        let instance = (0..fields.len())
            .rev()
            .find(|&i| !used[i] && fields[i].name.trim().eq_ignore_ascii_case(name));
        if let Some(i) = instance {
            used[i] = true;
            data.push_str(&relaxed_header(fields[i].raw));
            data.push_str("\r\n");
        }
    }
    let b_start = signature.raw.find("b=").filter(|&i| {
        // the b= tag, not the tail of bh=
        signature.raw[..i]
            .trim_end_matches([' ', '\t', '\r', '\n'])
            .ends_with(';')
    });
    let b_start = b_start.ok_or("no b= tag")? + 2;
    let b_end = signature.raw[b_start..]
        .find(';')
        .map_or(signature.raw.len(), |i| b_start + i);
    let emptied = format!("{}{}", &signature.raw[..b_start], &signature.raw[b_end..]);
    data.push_str(&relaxed_header(&emptied));

    let b = STANDARD
        .decode(tag(&tags, "b")?)
        .map_err(|e| e.to_string())?;
    let public_key = public_key_from_txt(txt)?;
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        public_key,
    )
    .verify(data.as_bytes(), &b)
    .map_err(|_| "bad RSA signature".to_string())?;

    Ok(Verified {
        domain: tag(&tags, "d")?.to_string(),
        selector: tag(&tags, "s")?.to_string(),
        timestamp: tag(&tags, "t")?.parse().map_err(|_| "bad t=")?,
        signed_headers,
    })
}
