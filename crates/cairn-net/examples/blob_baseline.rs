//! Baseline for `scripts/bench/sync.sh`: one file moved by a bare iroh-blobs transfer,
//! FsStore → FsStore over loopback, with cairn-net's own endpoint setup (no relays, no address
//! lookup, 127.0.0.1 only). Prints `import_s=… fetch_s=… bytes=… mib_s=…` on one line.
//!
//! Usage: cargo run --release -p cairn-net --example blob_baseline -- FILE WORKDIR

use std::time::Instant;

use cairn_crypto::DeviceKey;
use cairn_net::{Members, NetConfig, bind_endpoint};
use iroh::protocol::Router;
use iroh_blobs::{BlobsProtocol, store::fs::FsStore};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(file), Some(work)) = (args.next(), args.next()) else {
        eprintln!("usage: blob_baseline FILE WORKDIR");
        std::process::exit(2);
    };
    let work = std::path::PathBuf::from(work);
    let (ka, kb) = (DeviceKey::generate(), DeviceKey::generate());
    let ea = bind_endpoint(
        &ka,
        NetConfig::loopback(),
        Members::new([kb.device_id()]),
        None,
    )
    .await?;
    let eb = bind_endpoint(
        &kb,
        NetConfig::loopback(),
        Members::new([ka.device_id()]),
        None,
    )
    .await?;

    let sa = FsStore::load(work.join("a")).await?;
    let sb = FsStore::load(work.join("b")).await?;
    let t = Instant::now();
    let tag = sa.blobs().add_path(std::path::absolute(&file)?).await?;
    let import_s = t.elapsed().as_secs_f64();
    let router = Router::builder(ea.clone())
        .accept(iroh_blobs::ALPN, BlobsProtocol::new(&sa, None))
        .spawn();

    let t = Instant::now();
    let conn = eb.connect(ea.addr(), iroh_blobs::ALPN).await?;
    let stats = sb.remote().fetch(conn, tag.hash).await?;
    let fetch_s = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&file)?.len();
    println!(
        "import_s={import_s:.3} fetch_s={fetch_s:.3} bytes={bytes} mib_s={:.1} payload={}",
        bytes as f64 / (1 << 20) as f64 / fetch_s,
        stats.payload_bytes_read
    );
    router.shutdown().await?;
    sb.shutdown().await?;
    eb.close().await;
    Ok(())
}
