//! The regulations store beside the shared log: a JetStream KV bucket,
//! `<stream>_regulations`, one key per regulation (its id), its JSON the value. Every
//! instance watches the bucket, so a regulation added on one holds on all of them within
//! the time a watch message takes; a change carries the revision it was made from, so
//! two instances cannot both claim one deletion.

use anyhow::Context as _;
use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::StreamExt as _;

use crate::queue::NatsQueue;

/// One change seen by the watch: (id, revision, the JSON, or `None` when deleted).
pub type Change = (String, u64, Option<Bytes>);

pub struct SharedStore {
    kv: kv::Store,
}

impl SharedStore {
    /// Opens the bucket, creating it with the shared log's replicas if missing.
    pub async fn open(queue: &NatsQueue) -> anyhow::Result<SharedStore> {
        let bucket = format!("{}_regulations", queue.names().stream);
        let config = kv::Config {
            bucket: bucket.clone(),
            description: "fanout's privacy regulations".into(),
            // Only the latest value of each key matters.
            history: 1,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: queue.replicas(),
            ..Default::default()
        };
        // Instances started together race to make it: tried again like the stream.
        let kv = crate::queue::nats::retried_at_start("opening the regulations bucket", || async {
            queue
                .context()
                .create_or_update_key_value(config.clone())
                .await
                .with_context(|| format!("cannot open the regulations bucket `{bucket}`"))
        })
        .await?;
        Ok(SharedStore { kv })
    }

    /// Every regulation: (id, revision, JSON).
    pub async fn load_all(&self) -> anyhow::Result<Vec<(String, u64, Bytes)>> {
        let mut keys = self.kv.keys().await.context("cannot list regulations")?;
        let mut ids = Vec::new();
        while let Some(key) = keys.next().await {
            ids.push(key.context("cannot list regulations")?);
        }
        let mut found = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = self.kv.entry(id.clone()).await;
            let entry = entry.with_context(|| format!("cannot read regulation {id}"))?;
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) {
                found.push((id, entry.revision, entry.value));
            }
        }
        Ok(found)
    }

    /// Stores a new regulation; returns its revision, `None` when the id is taken.
    pub async fn insert(&self, id: &str, body: Bytes) -> anyhow::Result<Option<u64>> {
        match self.kv.create(id, body).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(e).context("cannot store the regulation"),
        }
    }

    /// Replaces the regulation if it is still at `revision`: the new revision, or `None`
    /// when another change came first.
    pub async fn update(
        &self,
        id: &str,
        body: Bytes,
        revision: u64,
    ) -> anyhow::Result<Option<u64>> {
        match self.kv.update(id, body, revision).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(e).context("cannot update the regulation"),
        }
    }

    pub async fn delete(&self, id: &str) -> anyhow::Result<()> {
        self.kv
            .delete(id)
            .await
            .context("cannot delete the regulation")
    }

    /// Hands `apply` every change to the bucket (the current values first), for as long
    /// as `apply` returns true. A broken watch is opened again after a second.
    pub fn watch(&self, mut apply: impl FnMut(Change) -> bool + Send + 'static) {
        let kv = self.kv.clone();
        tokio::spawn(async move {
            loop {
                match kv.watch_with_history(">").await {
                    Ok(mut changes) => {
                        while let Some(change) = changes.next().await {
                            let Ok(entry) = change else {
                                break;
                            };
                            let value =
                                (entry.operation == kv::Operation::Put).then_some(entry.value);
                            if !apply((entry.key, entry.revision, value)) {
                                return;
                            }
                        }
                        tracing::warn!("the regulations watch ended; watching again");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot watch the regulations bucket"),
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        });
    }
}
