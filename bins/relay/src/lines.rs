//! Command-line framing with a hard length limit.
//!
//! [`LineBuffer`] turns the bytes read from a client into complete command
//! lines (ending in LF; a CR before it is left for the parser). It never
//! holds more than the limit plus one read's worth of bytes: a line that
//! grows past the limit is reported once as [`Input::TooLong`] and the rest
//! of it, up to and including its LF, is discarded as it arrives.

/// What the buffer yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A complete line including its terminating LF.
    Line(Vec<u8>),
    /// A line longer than the limit; its bytes are (being) discarded.
    TooLong,
}

/// Splits a byte stream into bounded lines.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    max: usize,
    discarding: bool,
}

impl LineBuffer {
    /// A buffer yielding lines of at most `max` bytes (LF included).
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::with_capacity(max.min(1024)),
            max: max.max(1),
            discarding: false,
        }
    }

    /// Appends bytes read from the client. Call only after [`Self::next_input`]
    /// returned `None`, so the buffer stays bounded.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Bytes currently buffered (for tests and assertions).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete line, [`Input::TooLong`] once per over-long line,
    /// or `None` when more bytes are needed.
    pub fn next_input(&mut self) -> Option<Input> {
        loop {
            let newline = self.buf.iter().position(|&b| b == b'\n');
            if self.discarding {
                match newline {
                    Some(pos) => {
                        self.buf.drain(..=pos);
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        self.buf.clear();
                        return None;
                    }
                }
            }
            return match newline {
                Some(pos) if pos < self.max => Some(Input::Line(self.buf.drain(..=pos).collect())),
                Some(pos) => {
                    self.buf.drain(..=pos);
                    Some(Input::TooLong)
                }
                None if self.buf.len() >= self.max => {
                    self.buf.clear();
                    self.discarding = true;
                    Some(Input::TooLong)
                }
                None => None,
            };
        }
    }
}

/// One piece of a DATA body, as [`LineBuffer::next_data`] hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataInput {
    /// A complete line, LF (and CR) included.
    Line(Vec<u8>),
    /// The start of a line longer than the chunk limit, without its end;
    /// more of the same line follows.
    Partial(Vec<u8>),
}

impl LineBuffer {
    /// The next piece of a DATA body: a complete line, or — when a line grows
    /// past `max_chunk` bytes without a newline — its first `max_chunk`
    /// bytes, so memory stays bounded whatever the client sends. `None` when
    /// more input is needed.
    pub fn next_data(&mut self, max_chunk: usize) -> Option<DataInput> {
        let newline = self.buf.iter().position(|&b| b == b'\n');
        match newline {
            Some(pos) if pos < max_chunk => Some(DataInput::Line(self.buf.drain(..=pos).collect())),
            _ if self.buf.len() >= max_chunk => {
                Some(DataInput::Partial(self.buf.drain(..max_chunk).collect()))
            }
            Some(pos) => Some(DataInput::Line(self.buf.drain(..=pos).collect())),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(s: &str) -> Option<Input> {
        Some(Input::Line(s.as_bytes().to_vec()))
    }

    #[test]
    fn splits_pipelined_lines_in_order() {
        let mut b = LineBuffer::new(64);
        b.push(b"NOOP\r\nRSET\r\nQU");
        assert_eq!(b.next_input(), line("NOOP\r\n"));
        assert_eq!(b.next_input(), line("RSET\r\n"));
        assert_eq!(b.next_input(), None);
        b.push(b"IT\n");
        assert_eq!(b.next_input(), line("QUIT\n"));
        assert_eq!(b.next_input(), None);
        assert_eq!(b.buffered(), 0);
    }

    #[test]
    fn a_line_exactly_at_the_limit_passes() {
        let mut b = LineBuffer::new(8);
        b.push(b"123456\r\n");
        assert_eq!(b.next_input(), line("123456\r\n"));
        b.push(b"1234567\r\n");
        assert_eq!(b.next_input(), Some(Input::TooLong));
        assert_eq!(b.next_input(), None);
    }

    #[test]
    fn an_over_long_line_is_reported_once_and_discarded_in_bounded_memory() {
        let mut b = LineBuffer::new(16);
        for _ in 0..100 {
            b.push(&[b'A'; 10]);
            let _ = b.next_input();
            assert!(b.buffered() < 16 + 10);
        }
        b.push(b"AAAA\r\nNOOP\r\n");
        assert_eq!(b.next_input(), line("NOOP\r\n"));
        assert_eq!(b.next_input(), None);
    }

    #[test]
    fn too_long_is_yielded_once_per_line() {
        let mut b = LineBuffer::new(4);
        b.push(b"ABCDEFGH");
        assert_eq!(b.next_input(), Some(Input::TooLong));
        assert_eq!(b.next_input(), None);
        b.push(b"IJKL\nOK\n");
        assert_eq!(b.next_input(), line("OK\n"));
    }

    #[test]
    fn data_lines_and_bounded_partials() {
        let mut b = LineBuffer::new(16);
        b.push(b"line one\r\n.\r\n");
        assert_eq!(
            b.next_data(64),
            Some(DataInput::Line(b"line one\r\n".to_vec()))
        );
        assert_eq!(b.next_data(64), Some(DataInput::Line(b".\r\n".to_vec())));
        assert_eq!(b.next_data(64), None);
        b.push(&[b'x'; 100]);
        assert_eq!(b.next_data(64), Some(DataInput::Partial(vec![b'x'; 64])));
        assert_eq!(b.next_data(64), None, "the rest waits for its newline");
        b.push(b"\n");
        assert_eq!(
            b.next_data(64),
            Some(DataInput::Line([vec![b'x'; 36], b"\n".to_vec()].concat()))
        );
    }
}
