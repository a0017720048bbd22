//! Helper of `scripts/bench-events.sh` (not part of the agent): measures how
//! long a libvirt change on a host takes until the controller shows it.
//!
//! Keeps one mTLS admin connection to the controller and, for each sample,
//! waits a random 0.2–0.7 s (so changes land at random moments relative to
//! the agent's timers), starts `virsh -c URI <change> VM`, and from just
//! before that start polls `ListGuests(vm)` every `--poll-ms` until the
//! guest shows the new value. Prints one line per sample:
//! `KIND VALUE LATENCY_MS VIRSH_MS POLLS` (LATENCY_MS `timeout` when not seen
//! within 10 s).
//!
//! Run inside the lab's controller namespace (`ip netns exec lb-ctl ...`);
//! virsh reaches the host's libvirtd through its unix socket.
//!
//! Usage: bench_events --url URL --ca F --cert F --key F --vm NAME
//!        --virsh-uri URI --kind suspend|autostart [--count N] [--poll-ms N]

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lifeboat_common::tls::TlsFiles;
use lifeboat_proto::v1::{GuestState, ListGuestsRequest, admin_client::AdminClient};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, PartialEq, Debug)]
enum Seen {
    State(i32),
    Autostart(bool),
}

async fn read(admin: &mut AdminClient<Channel>, vm: &str, kind: &str) -> anyhow::Result<Seen> {
    let r = admin.list_guests(ListGuestsRequest { vm: vm.to_string(), ..Default::default() }).await?.into_inner();
    let g = r
        .guests
        .first()
        .and_then(|g| g.guest.as_ref())
        .ok_or_else(|| anyhow::anyhow!("controller does not list {vm}"))?;
    Ok(if kind == "suspend" { Seen::State(g.state) } else { Seen::Autostart(g.autostart) })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut a: HashMap<String, String> = HashMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let k = k.trim_start_matches("--").to_string();
        a.insert(k, it.next().ok_or_else(|| anyhow::anyhow!("missing value"))?);
    }
    let arg = |k: &str| a.get(k).cloned().ok_or_else(|| anyhow::anyhow!("missing --{k}"));
    let (vm, uri, kind) = (arg("vm")?, arg("virsh-uri")?, arg("kind")?);
    let count: usize = a.get("count").map_or(Ok(100), |s| s.parse())?;
    let poll = Duration::from_millis(a.get("poll-ms").map_or(Ok(5), |s| s.parse())?);
    lifeboat_common::tls::install_crypto_provider();
    let tls = TlsFiles { ca: arg("ca")?.into(), cert: arg("cert")?.into(), key: arg("key")?.into() }.load()?;
    let ch = Endpoint::from_shared(arg("url")?)?
        .tls_config(tls.client_config(lifeboat_common::pki::CONTROLLER_NAME))?
        .connect()
        .await?;
    let mut admin = AdminClient::new(ch);
    let (running, paused) = (GuestState::Running as i32, GuestState::Paused as i32);
    for i in 0..count {
        let now = read(&mut admin, &vm, &kind).await?;
        let (args, want): (Vec<&str>, Seen) = match (kind.as_str(), now) {
            ("suspend", Seen::State(s)) if s == running => (vec!["suspend"], Seen::State(paused)),
            ("suspend", Seen::State(s)) if s == paused => (vec!["resume"], Seen::State(running)),
            ("suspend", s) => anyhow::bail!("{vm} is neither running nor paused: {s:?}"),
            ("autostart", Seen::Autostart(false)) => (vec!["autostart"], Seen::Autostart(true)),
            ("autostart", Seen::Autostart(true)) => (vec!["autostart", "--disable"], Seen::Autostart(false)),
            _ => anyhow::bail!("unknown --kind {kind}"),
        };
        let jitter = 200 + u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * 500 / 255;
        tokio::time::sleep(Duration::from_millis(jitter)).await;
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new("virsh")
            .args(["-q", "-c", &uri])
            .args(&args)
            .arg(&vm)
            .stdout(std::process::Stdio::null())
            .spawn()?;
        let mut virsh_ms = None;
        let mut polls = 0u32;
        let latency = loop {
            if virsh_ms.is_none()
                && let Some(st) = child.try_wait()?
            {
                anyhow::ensure!(st.success(), "virsh {args:?} {vm} failed: {st}");
                virsh_ms = Some(t0.elapsed());
            }
            polls += 1;
            if read(&mut admin, &vm, &kind).await? == want {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                eprintln!("sample {i}: {want:?} not seen within 10 s");
                break None;
            }
            tokio::time::sleep(poll).await;
        };
        let virsh_ms = match virsh_ms {
            Some(d) => d,
            None => {
                let st = child.wait().await?;
                anyhow::ensure!(st.success(), "virsh {args:?} {vm} failed: {st}");
                t0.elapsed()
            }
        };
        let value = match want {
            Seen::State(s) => GuestState::try_from(s).map_or("?".into(), |s| s.as_str_name().to_string()),
            Seen::Autostart(b) => b.to_string(),
        };
        let latency = latency.map_or("timeout".to_string(), |l| format!("{:.1}", l.as_secs_f64() * 1e3));
        println!("{kind} {value} {latency} {:.1} {polls}", virsh_ms.as_secs_f64() * 1e3);
    }
    Ok(())
}
