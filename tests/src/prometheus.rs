//! Reads the Prometheus text format of Envoy's `/stats/prometheus` and the control plane's
//! `/metrics`, so that tests can assert values by name and labels.

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .filter_map(parse_sample)
            .collect();
        Metrics { samples }
    }

    /// The value of the sample with this name whose labels include all of `labels`
    /// (0 if there is none: Prometheus counters that were never touched may be absent).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .collect();
        assert!(
            matching.len() <= 1,
            "{name}{labels:?} matches several samples: {matching:?}"
        );
        matching.first().map_or(0.0, |s| s.value)
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.trim().parse::<f64>().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series.trim(), Vec::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y"` (values may contain escaped quotes and commas).
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_envoy_and_openmetrics_lines() {
        let m = Metrics::parse(
            "# TYPE signet_errors counter\n\
             signet_errors{signet_code=\"BAD_JSON\"} 2\n\
             signet_idempotent_hits{} 1\n\
             signet_exchange_latency_ms_bucket{le=\"0.5\"} 0\n\
             vex_total{tenant=\"a,\\\"b\"} 7\n\
             # EOF\n",
        );
        assert_eq!(
            m.value("signet_errors", &[("signet_code", "BAD_JSON")]),
            2.0
        );
        assert_eq!(m.value("signet_errors", &[("signet_code", "OTHER")]), 0.0);
        assert_eq!(m.value("signet_idempotent_hits", &[]), 1.0);
        assert_eq!(m.value("vex_total", &[("tenant", "a,\"b")]), 7.0);
        assert!(m.has("signet_exchange_latency_ms_bucket"));
    }
}
