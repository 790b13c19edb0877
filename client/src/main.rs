//! Command line: reads the options and the secret, then hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use cardgate_client::api::Api;
use cardgate_client::bulk::{self, Settings, BATCH_SIZE_MAX};
use cardgate_client::input;
use cardgate_client::journal::{self, Journal};
use cardgate_client::progress::Progress;
use cardgate_client::signing::{self, Credentials, Secret};

#[derive(Parser)]
#[command(
    name = "cardgate-client",
    version,
    about = "Bulk-order client for the cardgate reseller API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Buy every order of a CSV file and write each one's codes (or refusal) to a JSON Lines file
    #[command(after_long_help = ORDERS_HELP)]
    Orders(OrdersArgs),
}

const ORDERS_HELP: &str = "\
INPUT
  A CSV file with a header: merchant_order_no,sku,quantity[,max_unit_price]
  merchant_order_no: 1 to 64 of A-Z a-z 0-9 _ . : -, unique in the file (it is the
  server's idempotency key); quantity: a positive whole number; max_unit_price:
  optional, whole minor units (fen/cents). The whole file is checked first: if any
  row is wrong, nothing is sent.

OUTPUT
  One JSON line per order, written and synced to disk after every batch:
  {\"merchant_order_no\",\"status\":\"fulfilled\",\"order_id\",\"sku\",\"quantity\",\"amount\",\"currency\",\"codes\":[...]}
  or \"status\":\"failed\" with \"error\":{\"code\",\"message\"} (out_of_stock,
  insufficient_balance, price_changed, ...). A failure is final for this file.

RESUMING AFTER A CRASH OR AN INTERRUPTION
  Run the same command again with the same --output. Orders already in the output
  file are skipped (an incomplete last line left by a crash is cut off first); all
  others are sent again with the same merchant_order_no. The server treats that
  number as an idempotency key: an order it already fulfilled comes back as a replay
  with the same order and codes, and is not bought or charged twice. So nothing is
  bought twice and no codes are lost, whenever the previous run stopped. To try
  orders recorded as failed again (say after topping up the balance), delete their
  lines from the output file and run again.

SECRET
  The API secret is read from the environment variable named by --secret-env
  (default CARDGATE_SECRET), never from the command line, where other users could see
  it in the process list. It is never printed.

PACING AND RETRIES
  Orders go out in batches of --batch-size, paced at --rate orders per second. The
  server's 429 and 503 answers are obeyed (Retry-After, with jitter) and the same
  orders resent; a batch size the server refuses is halved. Connection errors,
  timeouts and 5xx answers are retried with exponential backoff, at most 8 attempts.

EXIT STATUS
  0  every order of the file is recorded in the output (fulfilled or failed)
  1  stopped early: bad input, authentication refused, server unreachable, or orders
     still unsettled after their retries; what was recorded stays, run again to resume
  2  bad command line";

#[derive(Args)]
struct OrdersArgs {
    /// The orders CSV file
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// JSON Lines output, appended to and resumed from
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// The gateway, e.g. https://api.example.com or http://127.0.0.1:8080
    #[arg(long, value_name = "URL")]
    base_url: String,
    /// The API key's public id (ak_...)
    #[arg(long, value_name = "ID")]
    key_id: String,
    /// Name of the environment variable holding the API secret (sk_...)
    #[arg(long, value_name = "NAME", default_value = "CARDGATE_SECRET")]
    secret_env: String,
    /// Orders per batch request (1 to 100; halved automatically if the tier allows fewer)
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=BATCH_SIZE_MAX as i64))]
    batch_size: u16,
    /// Orders per second to send at most (a batch counts each of its orders)
    #[arg(long, default_value_t = 20.0, value_parser = parse_rate)]
    rate: f64,
    /// Seconds to wait for one answer before treating it as lost (and resending)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout_secs: u64,
    /// No progress bar and no notes; errors are still printed
    #[arg(long)]
    quiet: bool,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && (0.01..=100_000.0).contains(&r) => Ok(r),
        _ => Err("a number of orders per second from 0.01 to 100000".into()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Orders(args) => orders(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_secret(var: &str) -> anyhow::Result<Secret> {
    // Only the variable's name ever appears in a message, never its value.
    match std::env::var(var) {
        Ok(s) if !s.trim().is_empty() => Ok(Secret::new(s)),
        Ok(_) => bail!("the environment variable {var} is empty; it must hold the API secret"),
        Err(std::env::VarError::NotPresent) => {
            bail!("the environment variable {var} is not set; it must hold the API secret (see --secret-env)")
        }
        Err(std::env::VarError::NotUnicode(_)) => bail!("the environment variable {var} is not valid UTF-8"),
    }
}

fn orders(args: OrdersArgs) -> anyhow::Result<ExitCode> {
    let secret = read_secret(&args.secret_env)?;
    if !signing::valid_key_id(&args.key_id) {
        bail!("--key-id {:?} is not a key id", args.key_id);
    }
    let credentials = Credentials {
        key_id: args.key_id.clone(),
        secret,
    };
    let api = Api::new(&args.base_url, credentials, Duration::from_secs(args.timeout_secs))?;

    // The input is checked whole before the output is even opened: a bad file changes nothing.
    let orders = input::read_orders_file(&args.input)?;
    let total = orders.len() as u64;
    let (mut journal, resumed) = Journal::open(&args.output)?;
    let plan = journal::plan_resume(orders, &resumed);

    let mut progress = Progress::new(total, plan.already_fulfilled, plan.already_failed, args.quiet);
    if resumed.torn_bytes > 0 {
        progress.note(format!(
            "{}: cut off an incomplete last line ({} bytes) left by an interrupted run; its orders will be sent again",
            journal.path().display(),
            resumed.torn_bytes
        ));
    }
    let recorded_before = plan.already_fulfilled + plan.already_failed;
    if recorded_before > 0 {
        progress.note(format!(
            "resuming: {recorded_before} of {total} orders already recorded in {}, sending the other {}",
            journal.path().display(),
            plan.to_send.len()
        ));
    }
    for c in &plan.changed {
        progress.note(format!("warning: {c}"));
    }
    if let Some(host) = api.batch_url().host_str() {
        let loopback = matches!(host, "localhost" | "127.0.0.1" | "[::1]");
        if api.batch_url().scheme() == "http" && !loopback {
            progress.note(format!(
                "warning: {host} is reached over plain http: the codes in the answers travel unencrypted"
            ));
        }
    }

    let settings = Settings {
        batch_size: usize::from(args.batch_size),
        rate_per_sec: args.rate,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(bulk::run(&api, &settings, &plan.to_send, &mut journal, &mut progress));
    progress.finish();
    let summary = outcome?;

    if !args.quiet {
        eprintln!(
            "{total} orders: {} fulfilled, {} failed ({} recorded by this run, {recorded_before} before); output in {}",
            progress.fulfilled,
            progress.failed,
            summary.fulfilled + summary.failed,
            journal.path().display()
        );
    }
    if summary.unsettled.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "error: {} orders are still unsettled after {} retries each; run the same command again later to resume:",
        summary.unsettled.len(),
        bulk::ITEM_RETRIES_MAX
    );
    for (mon, why) in summary.unsettled.iter().take(20) {
        eprintln!("  {mon}: {why}");
    }
    if summary.unsettled.len() > 20 {
        eprintln!("  ... and {} more", summary.unsettled.len() - 20);
    }
    Ok(ExitCode::FAILURE)
}
