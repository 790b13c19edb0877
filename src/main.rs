use std::process::ExitCode;

use cardgate::{telemetry, Config};
use tokio::net::TcpListener;

// Every request allocates and frees many small buffers across the runtime's threads
// (headers, keys, JSON); glibc's allocator spent about a third of a signed read's CPU on
// them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: cardgate [serve | reconcile | rebuild | rebates close <YYYY-MM> | healthcheck]\n\n  serve      run the gateway (the default)\n  reconcile  check stock, orders and balances across Redis and Postgres; prints a JSON\n             report and exits 1 if anything disagrees\n  rebuild    rebuild Redis's stock, hot balances and idempotency records from Postgres\n             now (gateways do it by themselves when Redis loses its state); prints a\n             JSON report\n  rebates close <YYYY-MM>\n             close a UTC month that has ended and credit its rebates (gateways close\n             each month by themselves rebate_close_delay_hours after it ends); prints\n             the month's rebates as JSON, also when it was closed already\n  healthcheck  exit 0 if the gateway at CARDGATE_LISTEN answers GET /healthz with 200\n               (for container health checks)\n\nConfiguration: config/default.toml, the file named in CARDGATE_CONFIG, then CARDGATE_* variables.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = args.first().cloned().unwrap_or_else(|| "serve".to_string());
    if command == "-h" || command == "--help" {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if command == "healthcheck" {
        return healthcheck();
    }
    if !["serve", "reconcile", "rebuild", "rebates"].contains(&command.as_str()) {
        eprintln!("unknown command {command:?}\n{USAGE}");
        return ExitCode::from(2);
    }
    // Checked before anything connects: a mistyped month costs nothing.
    let month = match (command.as_str(), args.get(1..).unwrap_or_default()) {
        ("rebates", [verb, month]) if verb == "close" => match cardgate::rebates::Month::parse(month) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("cardgate: {e}");
                return ExitCode::from(2);
            }
        },
        ("rebates", _) => {
            eprintln!("usage: cardgate rebates close <YYYY-MM>");
            return ExitCode::from(2);
        }
        _ => None,
    };
    telemetry::init_logging();
    let config = match Config::from_process_env().and_then(|c| c.validate().map(|v| (c, v))) {
        Ok(pair) => pair,
        Err(e) => {
            eprintln!("cardgate: {e}");
            return ExitCode::from(2);
        }
    };
    // Named, so that top, perf and flame graphs tell the gateway's threads from others'.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .thread_name("cardgate-worker")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cardgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match (command.as_str(), month) {
        ("reconcile", _) => runtime.block_on(reconcile(config.0)),
        ("rebuild", _) => runtime.block_on(rebuild(config.0)).map(|()| true),
        (_, Some(month)) => runtime.block_on(close_rebates(config.0, month)),
        _ => runtime.block_on(serve(config.0, config.1.listen)).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cardgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config, listen: std::net::SocketAddr) -> anyhow::Result<()> {
    // Listened for before anything starts: a SIGTERM sent while migrations run or Redis is
    // rebuilt stops the server once it is up, instead of killing it (or, as a container's
    // PID 1, being ignored and lost).
    let stop = shutdown_signal();
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let server = cardgate::Server::build(config, listener).await?;
    tracing::info!(addr = %server.local_addr()?, "cardgate listening");
    if let Some(admin) = server.admin_addr() {
        tracing::info!(addr = %admin, "operator API listening (and no longer on the public address)");
    }
    server.run(stop).await?;
    tracing::info!("cardgate stopped");
    Ok(())
}

/// `GET /healthz` on the configured listen address (loopback when it is a wildcard), with
/// the standard library alone: no runtime, no secrets needed.
fn healthcheck() -> ExitCode {
    use std::io::{Read, Write};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
    use std::time::Duration;
    let Some(mut addr) = Config::from_process_env()
        .ok()
        .and_then(|c| c.listen.parse::<SocketAddr>().ok())
    else {
        eprintln!("cardgate: no valid listen address configured");
        return ExitCode::from(2);
    };
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let timeout = Duration::from_secs(2);
    let probe = || -> std::io::Result<bool> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut status = [0u8; 12];
        s.read_exact(&mut status)?;
        Ok(&status[9..12] == b"200")
    };
    match probe() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("cardgate: {addr}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the report; true when everything agrees.
async fn reconcile(config: Config) -> anyhow::Result<bool> {
    let app = cardgate::app::App::build(config).await?;
    let report = cardgate::reconcile::run(&app).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(report.ok)
}

async fn rebuild(config: Config) -> anyhow::Result<()> {
    let app = cardgate::app::App::build(config).await?;
    let report = cardgate::rebuild::rebuild(&app, true).await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Prints the month's rebates as closed; true unless the close was refused (a month not
/// ended yet: the message says when it can be), which is told on stderr.
async fn close_rebates(config: Config, month: cardgate::rebates::Month) -> anyhow::Result<bool> {
    let app = cardgate::app::App::build(config).await?;
    let actor = cardgate::audit::Actor::command("rebates close");
    match cardgate::rebates::close(&app, &actor, month).await {
        Ok(closed) => {
            if closed.replayed {
                eprintln!("cardgate: {month} was closed already; its recorded rebates follow");
            }
            println!("{}", serde_json::to_string_pretty(&closed)?);
            Ok(true)
        }
        Err(e @ cardgate::error::ApiError::Internal(_)) => Err(anyhow::Error::new(e)),
        Err(e) => {
            eprintln!("cardgate: {month} not closed: {e}");
            Ok(false)
        }
    }
}

/// SIGTERM (orchestrators) or SIGINT (a terminal), listened for from the call on.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        // Either one alone still stops the server if the other cannot be listened for.
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>, name: &'static str| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                    tracing::info!("{name} received");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for {name}");
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::select! {
            _ = wait(term, "SIGTERM") => {}
            _ = wait(int, "SIGINT") => {}
        }
    }
}
