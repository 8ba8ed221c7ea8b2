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

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    /// A snapshot of `source` on `host` at the given UTC time.
    fn snap(id: &str, host: &str, source: &str, (y, mo, d, h): (i32, u32, u32, u32)) -> Manifest {
        let volume = serde_json::json!({
            "name": "v", "source": source, "kind": "file", "size": 0, "chunk_size": 65536,
            "filesystem": null, "map": "all blocks", "used_bytes": 0, "read_bytes": 0, "added_bytes": 0,
            "chunks": 0, "zero_chunks": 0, "new_chunks": 0, "index": "", "index_digest": ""
        });
        Manifest {
            format_version: 1,
            id: id.into(),
            time: Utc.with_ymd_and_hms(y, mo, d, h, 0, 0).unwrap(),
            host: host.into(),
            tags: Vec::new(),
            volumes: vec![serde_json::from_value(volume).unwrap()],
            duration: 0.0,
            rime_version: "test".into(),
            consistency: None,
            vms: None,
        }
    }

    fn kept(policy: Policy, all: &[Manifest]) -> Vec<String> {
        let mut ids: Vec<String> = apply(&policy, all).into_iter().filter(|d| d.keep).map(|d| d.id).collect();
        ids.sort();
        ids
    }

    /// Two backups a day at 01:00 and 13:00 from Monday 2026-11-02 to Sunday 2026-11-29 (28 days),
    /// ids `dDD-HH`.
    fn twice_daily() -> Vec<Manifest> {
        (2..=29)
            .flat_map(|d| [1, 13].map(|h| snap(&format!("d{d:02}-{h:02}"), "host", "/dev/sda1", (2026, 11, d, h))))
            .collect()
    }

    #[test]
    fn keep_last_keeps_the_newest() {
        assert_eq!(
            kept(Policy { keep_last: Some(3), ..Policy::default() }, &twice_daily()),
            ["d28-13", "d29-01", "d29-13"]
        );
    }

    #[test]
    fn keep_daily_keeps_the_newest_of_each_day() {
        assert_eq!(
            kept(Policy { keep_daily: Some(3), ..Policy::default() }, &twice_daily()),
            ["d27-13", "d28-13", "d29-13"]
        );
    }

    #[test]
    fn keep_weekly_keeps_the_newest_of_each_iso_week() {
        // ISO weeks 45..48 of 2026 end on Sundays 8, 15, 22 and 29 November.
        assert_eq!(
            kept(Policy { keep_weekly: Some(3), ..Policy::default() }, &twice_daily()),
            ["d15-13", "d22-13", "d29-13"]
        );
    }

    #[test]
    fn keep_monthly_keeps_the_newest_of_each_month() {
        let mut all = twice_daily();
        all.push(snap("oct31", "host", "/dev/sda1", (2026, 10, 31, 23)));
        all.push(snap("oct01", "host", "/dev/sda1", (2026, 10, 1, 0)));
        all.push(snap("sep15", "host", "/dev/sda1", (2026, 9, 15, 12)));
        assert_eq!(kept(Policy { keep_monthly: Some(2), ..Policy::default() }, &all), ["d29-13", "oct31"]);
    }

    #[test]
    fn rules_combine_and_every_kept_snapshot_says_why() {
        let policy = Policy { keep_last: Some(2), keep_daily: Some(2), keep_weekly: Some(2), ..Policy::default() };
        let decisions = apply(&policy, &twice_daily());
        let reasons = |id: &str| decisions.iter().find(|d| d.id == id).unwrap().reasons.clone();
        assert_eq!(reasons("d29-13"), ["last", "daily", "weekly"]);
        assert_eq!(reasons("d29-01"), ["last"]);
        assert_eq!(reasons("d28-13"), ["daily"]);
        assert_eq!(reasons("d22-13"), ["weekly"]);
        assert_eq!(decisions.iter().filter(|d| d.keep).count(), 4);
        assert!(decisions.iter().all(|d| d.keep != d.reasons.is_empty()));
    }

    #[test]
    fn each_host_and_volume_set_is_judged_on_its_own() {
        let all = vec![
            snap("a1", "host", "/dev/sda1", (2026, 11, 1, 0)),
            snap("a2", "host", "/dev/sda1", (2026, 11, 2, 0)),
            snap("b1", "host", "/dev/sdb1", (2026, 11, 1, 0)),
            snap("c1", "other", "/dev/sda1", (2026, 10, 1, 0)),
        ];
        assert_eq!(kept(Policy { keep_last: Some(1), ..Policy::default() }, &all), ["a2", "b1", "c1"]);
    }

    #[test]
    fn an_empty_policy_keeps_nothing() {
        assert!(Policy::default().is_empty());
        assert!(kept(Policy::default(), &twice_daily()).is_empty());
    }
}
