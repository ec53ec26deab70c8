//! Writes and reads one patient's key through a running node:
//! `cargo run -p dossier-client --example quickstart -- 127.0.0.1:7000`.

use dossier_client::{Client, ClientConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seed = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7000".to_owned());
    let client = Client::connect(ClientConfig::new([seed])).await?;
    let written = client
        .put("patient-42", b"allergies", b"penicillin")
        .await?;
    println!("written at log index {}", written.index);
    let value = client.get("patient-42", b"allergies").await?;
    println!(
        "read back: {:?}",
        value.map(|v| String::from_utf8_lossy(&v).into_owned())
    );
    Ok(())
}
