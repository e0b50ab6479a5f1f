//! clamd's `zINSTREAM` command: the whole message in length-prefixed
//! chunks, a zero-length chunk to end, then one NUL-terminated answer:
//! `stream: OK`, `stream: <signature> FOUND` or `... ERROR`.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{Address, Answer, FilterError, Verdict};
use tern_smtp::reply::Reply;

/// Chunk size on the wire (clamd reads any size up to its StreamMaxLength).
const CHUNK: usize = 64 * 1024;

/// Longest answer read; clamd's are one short line.
const MAX_ANSWER: usize = 4096;

pub async fn scan(address: &Address, message: &[u8]) -> Result<Answer, FilterError> {
    let mut stream = address.connect().await?;
    let sent = async {
        stream.write_all(b"zINSTREAM\0").await?;
        for chunk in message.chunks(CHUNK) {
            // CHUNK fits in u32.
            stream.write_all(&(chunk.len() as u32).to_be_bytes()).await?;
            stream.write_all(chunk).await?;
        }
        stream.write_all(&0u32.to_be_bytes()).await?;
        stream.flush().await
    }
    .await;
    // clamd answers (e.g. "INSTREAM size limit exceeded") and closes while
    // we still write: read its answer before reporting the write error.
    let mut answer = Vec::new();
    let read = (&mut stream).take(MAX_ANSWER as u64).read_to_end(&mut answer).await;
    if answer.is_empty() {
        sent?;
        read?;
    }
    let text = String::from_utf8_lossy(&answer);
    verdict(text.trim_end_matches(['\0', '\n', '\r']))
}

/// The verdict of one clamd answer line.
fn verdict(answer: &str) -> Result<Answer, FilterError> {
    let result = answer.strip_prefix("stream:").unwrap_or(answer).trim();
    if result == "OK" {
        return Ok(Answer::accept());
    }
    if let Some(signature) = result.strip_suffix(" FOUND") {
        // The signature name is clamd's; keep the reply printable and short.
        let signature: String = signature.chars().filter(|c| c.is_ascii_graphic()).take(100).collect();
        return Ok(Answer {
            verdict: Verdict::Refuse(Reply::new(
                554,
                "5.7.1",
                format!("Message refused: virus found ({signature})"),
            )),
            edits: Vec::new(),
        });
    }
    Err(FilterError::Protocol(format!("clamd answered {answer:?}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        assert_eq!(verdict("stream: OK").unwrap().verdict, Verdict::Accept);
        match verdict("stream: Eicar-Test-Signature.local FOUND").unwrap().verdict {
            Verdict::Refuse(reply) => {
                assert_eq!(reply.code, 554);
                assert!(reply.text().contains("Eicar-Test-Signature.local"), "{}", reply.text());
            }
            other => panic!("{other:?}"),
        }
        assert!(verdict("INSTREAM size limit exceeded. ERROR").is_err());
        assert!(verdict("").is_err());
    }
}
