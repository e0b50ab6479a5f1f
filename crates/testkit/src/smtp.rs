//! A small blocking SMTP client, enough to drive a node and check its
//! replies, and the reply reader the load generator shares.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Reads one (possibly multi-line) SMTP reply from `r`, its lines joined
/// by '\n'.
pub fn read_reply(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        let done = line.len() < 4 || line.as_bytes()[3] != b'-';
        all.push_str(line.trim_end_matches(['\r', '\n']));
        if done {
            return Ok(all);
        }
        all.push('\n');
    }
}

/// A small blocking SMTP client (greeting read, no EHLO sent).
pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Client {
            stream: BufReader::new(stream),
        };
        let greeting = c.read_reply()?;
        if !greeting.starts_with("220") {
            return Err(std::io::Error::other(format!("greeting: {greeting}")));
        }
        Ok(c)
    }

    /// Reads one (possibly multi-line) reply, returned with its lines joined by '\n'.
    pub fn read_reply(&mut self) -> std::io::Result<String> {
        read_reply(&mut self.stream)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.get_mut().write_all(bytes)
    }

    pub fn command(&mut self, line: &str) -> std::io::Result<String> {
        self.send_raw(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// One whole transaction; returns the queue id from the final 250.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> std::io::Result<String> {
        let expect = |reply: String, code: &str| {
            if reply.starts_with(code) {
                Ok(reply)
            } else {
                Err(std::io::Error::other(reply))
            }
        };
        expect(self.command(&format!("MAIL FROM:<{from}>"))?, "250")?;
        for rcpt in to {
            expect(self.command(&format!("RCPT TO:<{rcpt}>"))?, "250")?;
        }
        expect(self.command("DATA")?, "354")?;
        self.send_raw(body.as_bytes())?;
        let reply = expect(self.command(".")?, "250")?;
        reply
            .rsplit(' ')
            .next()
            .map(str::to_owned)
            .ok_or_else(|| std::io::Error::other("no queue id"))
    }

    /// Reads whatever the server sends until it closes the connection.
    pub fn read_to_end(&mut self) -> String {
        let mut s = String::new();
        let _ = self.stream.read_to_string(&mut s);
        s
    }
}

/// A message body with a unique Message-ID.
pub fn body(id: &str, size: usize) -> String {
    let mut b = format!(
        "From: <sender@tern.test>\r\nTo: <rcpt@example.test>\r\nSubject: test {id}\r\nMessage-ID: <{id}@tern.test>\r\n\r\n"
    );
    while b.len() < size {
        b.push_str("The quick brown fox jumps over the lazy dog 0123456789.\r\n");
    }
    b
}
