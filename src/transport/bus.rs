//! The AMQP transport (`[bus]`): purges over a message broker (RabbitMQ), for fleets that
//! outgrow peer-to-peer fan-out. The client is `lapin` on tokio; no protocol code here.
//!
//! - **Publishing**: every message goes to a durable fanout exchange (`bus.exchange`), as a
//!   persistent message, with publisher confirms. Messages leave a bounded outbox in order,
//!   one at a time; one is taken off only when the broker confirmed it. A purge is answered
//!   2xx once the broker confirmed it (or memcached's log took it too), within
//!   `bus.confirm_timeout`; otherwise 503 "applied locally, retry", and the message stays in
//!   the outbox until the broker is back. An outbox past `bus.outbox` loses its oldest: the
//!   receivers see the jump in sequence numbers and drop their caches.
//! - **Consuming**: each corral has its own durable queue, named from the namespace and its
//!   node (host name and port), so a restarted corral gets its queue back and applies what was
//!   published meanwhile. Messages are applied through the inbox, then acked (manual acks).
//!   The queue keeps at most `bus.queue_max` messages (`x-max-length`, `drop-head`): one that
//!   overflowed shows as a gap in an origin's sequence numbers, and the consumer drops its L1.
//! - **Broker down**: publishing fails fast (bounded by the confirm timeout), the connection
//!   is retried with back-off, and the state change is logged once each way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::{Envelope, Inbox, Message, Outcome, Receipt, Transport, VERSION};
use crate::config::BusConfig;
use crate::metrics;
use crate::purge;

/// A queue not consumed for this long is deleted by the broker (`x-expires`).
const QUEUE_EXPIRES_MS: i64 = 7 * 24 * 3600 * 1000;

/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The longest a session's set-up (channels, exchange, queue, binding, consumer) may take
/// once connected. Each step waits for the broker's answer, and a broker that is still
/// recovering its queues, or a connection that died without a reset, may never give one: the
/// attempt is then closed and retried, instead of waiting for ever with the outbox held.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The AMQP heartbeat corral asks for (seconds) unless `bus.amqp_url` sets one: the broker and
/// corral each declare the connection dead after missing two. (`heartbeat=0` in the URL does
/// not turn it off: lapin then takes the broker's value.) A corral that only consumes
/// learns that its connection died from the heartbeat alone (a broker host that vanished, a
/// firewall that dropped the connection); RabbitMQ's 60 s default would leave it deaf to
/// purges for two minutes.
const HEARTBEAT_SECS: u16 = 10;

pub struct Bus {
    cfg: BusConfig,
    /// This corral's queue.
    queue: String,
    outbox: parking_lot::Mutex<VecDeque<Arc<Message>>>,
    wake: Notify,
    /// (last sequence number confirmed, failed publish attempts so far).
    progress: watch::Sender<(u64, u64)>,
    status: parking_lot::Mutex<Status>,
}

#[derive(Default, Serialize)]
struct Status {
    connected: bool,
    /// Since when in that state (ms since the epoch).
    since_ms: u64,
    last_error: Option<String>,
    published: u64,
    confirmed: u64,
    nacked: u64,
    outbox_dropped: u64,
    consumed: u64,
    applied: u64,
    gaps: u64,
}

impl Bus {
    /// The bus of `cfg`; `namespace` and `node` name this corral's queue.
    pub fn new(cfg: &BusConfig, namespace: &str, node: &str) -> Self {
        metrics::BUS_CONNECTED.set(0);
        Bus {
            cfg: cfg.clone(),
            queue: format!("{}.{namespace}.{node}", cfg.exchange),
            outbox: parking_lot::Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            progress: watch::channel((0, 0)).0,
            status: parking_lot::Mutex::new(Status::default()),
        }
    }

    /// Connect, publish and consume until the connection fails; then again, with back-off.
    async fn run(&'static self, inbox: &'static Inbox) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let since = self.status.lock().since_ms;
            let result = self.session(inbox).await;
            if self.status.lock().since_ms != since {
                // it connected this time: the next failure starts the back-off over
                backoff = Duration::from_millis(100);
            }
            let why = match result {
                Ok(()) => "connection closed".to_string(),
                Err(e) => e,
            };
            self.set_connected(false, Some(why));
            // receipts waiting for a confirm learn that it will not come soon
            self.progress.send_modify(|p| p.1 += 1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn set_connected(&self, connected: bool, error: Option<String>) {
        // never both locks at once (publish takes the outbox's, then counts)
        let outbox = self.outbox.lock().len();
        let mut st = self.status.lock();
        if st.connected == connected && st.since_ms != 0 {
            if error.is_some() && error != st.last_error {
                // still down, for another reason (a setting the broker refuses): say so
                warn!(error = %error.clone().unwrap_or_default(), outbox, "message bus still unreachable");
                st.last_error = error;
            }
            return;
        }
        st.connected = connected;
        st.since_ms = purge::millis(SystemTime::now());
        metrics::BUS_CONNECTED.set(connected as i64);
        if connected {
            info!(queue = %self.queue, exchange = %self.cfg.exchange, outbox, "message bus connected: purges published and consumed");
        } else {
            let e = error.clone().unwrap_or_default();
            warn!(error = %e, outbox, "message bus unreachable: purges kept in the outbox, retried with back-off");
        }
        if error.is_some() {
            st.last_error = error;
        }
    }

    async fn session(&'static self, inbox: &'static Inbox) -> Result<(), String> {
        let conn = self.connect().await?;
        let step = parking_lot::Mutex::new("open a channel");
        let (publish, consumer) = match tokio::time::timeout(SETUP_TIMEOUT, self.set_up(&conn, &step)).await {
            Ok(Ok(set)) => set,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => format!(
                        "{}: no answer from the broker within {SETUP_TIMEOUT:?}",
                        step.lock()
                    ),
                };
                // closed, not only dropped: lapin keeps a connection whose close is not sent
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "set-up failed")).await;
                return Err(why);
            }
        };
        self.set_connected(true, None);
        let result = tokio::select! {
            r = self.publish_loop(&publish) => r,
            r = self.consume_loop(consumer, inbox) => r,
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(0, "corral reconnects")).await;
        result
    }

    /// Connect to the broker, with [`HEARTBEAT_SECS`] unless the URL sets a heartbeat.
    async fn connect(&self) -> Result<Connection, String> {
        let props = ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio);
        // checked when the configuration was read
        let mut uri: lapin::uri::AMQPUri = self.cfg.amqp_url.parse()?;
        uri.query.heartbeat.get_or_insert(HEARTBEAT_SECS);
        let connect = Connection::connect_uri(uri, props);
        tokio::time::timeout(self.cfg.confirm_timeout.max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| "connect: timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))
    }

    /// Declare the exchange and this corral's queue, bind it, and start consuming; `step` says
    /// which step is waiting for the broker.
    async fn set_up(
        &self,
        conn: &Connection,
        step: &parking_lot::Mutex<&'static str>,
    ) -> Result<(Channel, lapin::Consumer), String> {
        let publish = conn.create_channel().await.map_err(|e| e.to_string())?;
        *step.lock() = "declare the exchange";
        publish
            .exchange_declare(
                &self.cfg.exchange,
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("exchange {}: {e}", self.cfg.exchange))?;
        *step.lock() = "select publisher confirms";
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        *step.lock() = "open the consumer's channel";
        let consume = conn.create_channel().await.map_err(|e| e.to_string())?;
        *step.lock() = "declare the queue";
        let mut args = FieldTable::default();
        args.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(self.cfg.queue_max as i64),
        );
        args.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
        // a queue nobody consumed for a week goes (corrals of the past: pods, hosts renamed);
        // a corral that comes back after that finds a gap, and drops its cache
        args.insert("x-expires".into(), AMQPValue::LongLongInt(QUEUE_EXPIRES_MS));
        consume
            .queue_declare(
                &self.queue,
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| format!("queue {}: {e}", self.queue))?;
        *step.lock() = "bind the queue";
        consume
            .queue_bind(
                &self.queue,
                &self.cfg.exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        *step.lock() = "set the prefetch";
        consume
            .basic_qos(256, BasicQosOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        *step.lock() = "start consuming";
        let tag = format!("corral-{}", purge::corral_id());
        let consumer = consume
            .basic_consume(
                &self.queue,
                &tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok((publish, consumer))
    }

    /// Publish the outbox, in order, one confirmed message at a time.
    async fn publish_loop(&self, channel: &Channel) -> Result<(), String> {
        loop {
            let woken = self.wake.notified();
            let next = self.outbox.lock().front().cloned();
            let Some(msg) = next else {
                woken.await;
                continue;
            };
            let payload = serde_json::to_vec(&*msg).map_err(|e| e.to_string())?;
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into());
            let sent = async {
                channel
                    .basic_publish(
                        &self.cfg.exchange,
                        "",
                        BasicPublishOptions::default(),
                        &payload,
                        props,
                    )
                    .await?
                    .await
            };
            self.status.lock().published += 1;
            metrics::BUS_PUBLISHED.inc();
            match tokio::time::timeout(self.cfg.confirm_timeout, sent).await {
                Ok(Ok(Confirmation::Ack(_))) | Ok(Ok(Confirmation::NotRequested)) => {
                    let mut outbox = self.outbox.lock();
                    if outbox.front().is_some_and(|m| m.seq == msg.seq) {
                        outbox.pop_front();
                    }
                    metrics::BUS_OUTBOX.set(outbox.len() as i64);
                    drop(outbox);
                    self.status.lock().confirmed += 1;
                    metrics::BUS_CONFIRMED.inc();
                    self.progress.send_modify(|p| p.0 = p.0.max(msg.seq));
                }
                Ok(Ok(Confirmation::Nack(_))) => {
                    self.status.lock().nacked += 1;
                    metrics::BUS_NACKED.inc();
                    self.progress.send_modify(|p| p.1 += 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(Err(e)) => return Err(format!("publish: {e}")),
                Err(_) => return Err(format!("no confirm within {:?}", self.cfg.confirm_timeout)),
            }
        }
    }

    /// Apply what arrives on this corral's queue, then ack it.
    async fn consume_loop(&self, mut consumer: lapin::Consumer, inbox: &'static Inbox) -> Result<(), String> {
        while let Some(delivery) = consumer.next().await {
            let delivery = delivery.map_err(|e| format!("consume: {e}"))?;
            metrics::BUS_CONSUMED.inc();
            match serde_json::from_slice::<Message>(&delivery.data) {
                Ok(msg) if msg.v == VERSION => {
                    let env = Envelope {
                        v: VERSION,
                        origin: msg.origin,
                        node: msg.node.clone(),
                        covers: (msg.seq, msg.seq),
                        messages: vec![Arc::new(msg)],
                    };
                    // the bus may join sites that do not share memcached: a sender that
                    // restarted may have lost purges nobody else carries
                    let got = inbox.receive_from(&env, false);
                    // ... nor this corral's memcached: what another site's corral purged is
                    // written to this site's too, before the message is acked (a corral that
                    // stops before it gets the message again). A claimed relay is tried three
                    // times (1.2 s of waits, plus memcached's answers): a slow memcached holds
                    // up the messages behind it
                    for r in &got.relay {
                        inbox.relay(r).await;
                    }
                    let mut st = self.status.lock();
                    st.consumed += 1;
                    st.applied += got.applied as u64;
                    st.gaps += got.gap as u64;
                    metrics::BUS_APPLIED.inc_by(got.applied as u64);
                }
                // a message this corral cannot read: what it purged is unknown
                _ => {
                    self.status.lock().consumed += 1;
                    metrics::PEER_RECEIVED.with_label_values(&["invalid"]).inc();
                    inbox.unreadable("a bus message this corral cannot read");
                }
            }
            delivery
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| format!("ack: {e}"))?;
        }
        Err("the broker cancelled the consumer".into())
    }
}

impl Transport for Bus {
    fn name(&self) -> &'static str {
        "bus"
    }

    fn publish(&self, msg: Arc<Message>) -> Vec<Receipt> {
        let seq = msg.seq;
        let mut rx = self.progress.subscribe();
        let failures_before = rx.borrow().1;
        let dropped = {
            let mut outbox = self.outbox.lock();
            outbox.push_back(msg);
            // past its bound the oldest goes; receivers see the jump and drop their caches
            let dropped = outbox.len() > self.cfg.outbox && outbox.pop_front().is_some();
            metrics::BUS_OUTBOX.set(outbox.len() as i64);
            dropped
        };
        let connected = {
            let mut st = self.status.lock();
            st.outbox_dropped += dropped as u64;
            st.connected
        };
        if dropped {
            metrics::BUS_OUTBOX_DROPPED.inc();
        }
        self.wake.notify_one();
        let outcome = async move {
            if !connected {
                // the broker is away: the purge is answered now, not after confirm_timeout
                return Outcome::Failed("the message bus is unreachable (kept in the outbox)".into());
            }
            loop {
                let (confirmed, failures) = *rx.borrow_and_update();
                if confirmed >= seq {
                    return Outcome::Delivered;
                }
                if failures > failures_before {
                    return Outcome::Failed("the broker did not confirm it (kept in the outbox)".into());
                }
                if rx.changed().await.is_err() {
                    return Outcome::Failed("stopped".into());
                }
            }
        };
        vec![Receipt {
            to: "bus".into(),
            outcome: Box::pin(outcome),
            required: true,
        }]
    }

    fn start(&'static self, inbox: &'static Inbox) {
        // what it publishes names this corral's purge log, once read (`Message::log`)
        inbox.follow_log();
        tokio::spawn(self.run(inbox));
    }

    fn status(&self) -> serde_json::Value {
        let outbox = self.outbox.lock().len();
        let st = self.status.lock();
        let mut v = serde_json::to_value(&*st).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("queue".into(), self.queue.clone().into());
            o.insert("exchange".into(), self.cfg.exchange.clone().into());
            o.insert("outbox".into(), outbox.into());
            o.insert(
                "since_s".into(),
                (purge::millis(SystemTime::now()).saturating_sub(st.since_ms) / 1000).into(),
            );
        }
        v
    }
}
