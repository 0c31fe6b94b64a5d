//! Length-prefixed framing shared by the cairn protocols: a big-endian `u32` length, then
//! that many bytes. Every read has a caller-chosen size cap, so a peer cannot make us buffer
//! more than the protocol allows.

use iroh::endpoint::{ReadExactError, RecvStream, SendStream, WriteError};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("the peer closed the stream or connection: {0}")]
    Read(#[from] ReadExactError),
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
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(Some(body))
}
