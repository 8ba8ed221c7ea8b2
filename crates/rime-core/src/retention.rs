//! Retention policies: which snapshots `forget --keep-...` and cyclic backups keep.
//!
//! Snapshots are grouped by host and set of volume sources; each group is judged on its own.
//! Within a group, newest first, a snapshot is kept if it is among the last N, or if it is the
//! newest of a day/week/month that still has a slot under the matching `keep_*` count.

use chrono::Datelike;
use rime_repo::Manifest;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub keep_last: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    pub reasons: Vec<String>,
}

/// Applies `policy` to `manifests`; returns one decision per snapshot.
pub fn apply(policy: &Policy, manifests: &[Manifest]) -> Vec<Decision> {
    let mut groups: BTreeMap<(String, Vec<String>), Vec<&Manifest>> = BTreeMap::new();
    for m in manifests {
        groups.entry(m.group_key()).or_default().push(m);
    }
    let mut out = Vec::new();
    for (_, mut group) in groups {
        group.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.id.cmp(&a.id)));
        type Bucket = fn(&Manifest) -> String;
        let buckets: [(&str, Option<usize>, Bucket); 3] = [
            ("daily", policy.keep_daily, |m| m.time.format("%Y-%m-%d").to_string()),
            ("weekly", policy.keep_weekly, |m| {
                let w = m.time.iso_week();
                format!("{}-W{}", w.year(), w.week())
            }),
            ("monthly", policy.keep_monthly, |m| m.time.format("%Y-%m").to_string()),
        ];
        let mut last_bucket: [Option<String>; 3] = [None, None, None];
        let mut used = [0usize; 3];
        for (i, m) in group.iter().enumerate() {
            let mut reasons = Vec::new();
            if policy.keep_last.is_some_and(|n| i < n) {
                reasons.push("last".to_string());
            }
            for (k, (name, limit, bucket)) in buckets.iter().enumerate() {
                let Some(limit) = limit else { continue };
                let b = bucket(m);
                if last_bucket[k].as_ref() != Some(&b) && used[k] < *limit {
                    used[k] += 1;
                    reasons.push(name.to_string());
                }
                last_bucket[k] = Some(b);
            }
            out.push(Decision { id: m.id.clone(), keep: !reasons.is_empty(), reasons });
        }
    }
    out
}
