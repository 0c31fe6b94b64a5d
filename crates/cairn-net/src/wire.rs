//! Length-prefixed framing shared by the cairn protocols: a big-endian `u32` length, then
//! that many bytes. Every read has a caller-chosen size cap, so a peer cannot make us buffer
//! more than the protocol allows, and the announced length is only a claim: the buffer grows
//! with the bytes that actually arrive (at most [`READ_STEP`] ahead of them), so a peer that
//! announces the cap and sends nothing costs us nothing.

use iroh::endpoint::{SendStream, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt};

/// How far the receive buffer may run ahead of the bytes received. Small enough that a lying
/// length costs little, large enough that a legitimate multi-MiB frame (a FetchAll reply)
/// needs few reads.
pub(crate) const READ_STEP: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the stream or connection: {0}")]
    Read(#[from] std::io::Error),
    #[error("the peer ended the stream after {got} of the {len} bytes it announced")]
    Cut { got: usize, len: usize },
    #[error("could not send to the peer: {0}")]
    Write(#[from] WriteError),
    #[error("the peer sent a {len}-byte message, more than the {max} bytes this protocol allows")]
    TooLarge { len: usize, max: usize },
}

pub async fn write_frame(send: &mut SendStream, body: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(body).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly before a new frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    recv: &mut R,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(len) = read_frame_len(recv).await? else {
        return Ok(None);
    };
    read_frame_body(recv, len, max).await.map(Some)
}

/// Reads a frame's length prefix; `Ok(None)` when the stream ends cleanly before it. Lets a
/// caller look at the start of the body ([`read_frame_body`]) before choosing the cap for
/// the rest.
pub async fn read_frame_len<R: AsyncRead + Unpin>(
    recv: &mut R,
) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match recv.read(&mut len[got..]).await? {
            0 if got == 0 => return Ok(None),
            0 => return Err(FrameError::Cut { got, len: 4 }),
            n => got += n,
        }
    }
    Ok(Some(u32::from_be_bytes(len) as usize))
}

/// Reads `len` bytes of a frame body, refusing `len > max` before reading any of it. Memory
/// grows with what arrives, never more than [`READ_STEP`] ahead of it.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    recv: &mut R,
    len: usize,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = Vec::with_capacity(len.min(READ_STEP));
    while body.len() < len {
        let at = body.len();
        let end = at + (len - at).min(READ_STEP);
        body.resize(end, 0);
        let mut filled = at;
        while filled < end {
            match recv.read(&mut body[filled..end]).await? {
                0 => return Err(FrameError::Cut { got: filled, len }),
                n => filled += n,
            }
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_alloc::largest_allocation_during;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn frames_round_trip_across_read_steps() {
        for len in [
            0,
            1,
            READ_STEP - 1,
            READ_STEP,
            READ_STEP + 1,
            3 * READ_STEP + 7,
        ] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut input = frame(&body);
            input.extend_from_slice(&frame(b"next"));
            let mut r = &input[..];
            let got = block_on(read_frame(&mut r, len)).unwrap();
            assert_eq!(got.as_deref(), Some(&body[..]), "len {len}");
            assert_eq!(block_on(read_frame(&mut r, 4)).unwrap().unwrap(), b"next");
            assert!(block_on(read_frame(&mut r, 4)).unwrap().is_none());
        }
    }

    #[test]
    fn oversized_and_cut_frames_are_clear_errors() {
        let input = frame(&[7; 100]);
        let err = block_on(read_frame(&mut &input[..], 99)).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 100, max: 99 }));
        assert_eq!(
            err.to_string(),
            "the peer sent a 100-byte message, more than the 99 bytes this protocol allows"
        );
        let err = block_on(read_frame(&mut &input[..50], 100)).unwrap_err();
        assert!(
            matches!(err, FrameError::Cut { got: 46, len: 100 }),
            "{err}"
        );
        let err = block_on(read_frame(&mut &input[..2], 100)).unwrap_err();
        assert!(matches!(err, FrameError::Cut { got: 2, len: 4 }), "{err}");
    }

    /// A peer announcing a frame at the cap and sending a few bytes must not make us reserve
    /// the announced size: the largest single allocation stays near [`READ_STEP`].
    #[test]
    fn a_lying_length_allocates_only_what_arrives() {
        const CAP: usize = 64 << 20;
        let mut input = (CAP as u32).to_be_bytes().to_vec();
        input.extend_from_slice(&[1; 10]);
        // The runtime is built outside the measurement: only the read is measured.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (result, largest) =
            largest_allocation_during(|| rt.block_on(read_frame(&mut &input[..], CAP)));
        assert!(matches!(result, Err(FrameError::Cut { got: 10, .. })));
        assert!(
            largest <= 2 * READ_STEP,
            "largest allocation {largest} bytes for a frame that sent 10"
        );
        // And a legitimate large frame still arrives whole.
        let body = vec![3u8; 5 * READ_STEP];
        let input = frame(&body);
        assert_eq!(
            block_on(read_frame(&mut &input[..], CAP)).unwrap().unwrap(),
            body
        );
    }
}
