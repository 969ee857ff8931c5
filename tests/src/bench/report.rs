//! Figures: one JSON object per line on stdout, and a table on stderr for a person.

use serde_json::{Value, json};

/// Collects figures of a scenario.
#[derive(Default)]
pub struct Report {
    figures: Vec<Value>,
}

impl Report {
    /// Records and prints one figure.
    pub fn figure(&mut self, scenario: &str, name: &str, labels: Value, value: f64, unit: &str) {
        let v = json!({"scenario": scenario, "figure": name, "labels": labels, "value": (value * 1000.0).round() / 1000.0, "unit": unit});
        println!("{v}");
        self.figures.push(v);
    }

    /// Records a skipped scenario with its reason.
    pub fn skipped(&mut self, scenario: &str, reason: &str) {
        let v = json!({"scenario": scenario, "skipped": reason});
        println!("{v}");
        self.figures.push(v);
    }

    /// Takes the figures of another report (already printed).
    pub fn extend(&mut self, other: Report) {
        self.figures.extend(other.figures);
    }

    /// A human table of every figure.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for f in &self.figures {
            if let Some(r) = f.get("skipped") {
                out.push_str(&format!(
                    "{:<16} skipped: {}\n",
                    f["scenario"].as_str().unwrap_or(""),
                    r.as_str().unwrap_or("")
                ));
                continue;
            }
            let labels = f["labels"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().map(str::to_string).unwrap_or(v.to_string())))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<16} {:<28} {:<52} {:>12} {}\n",
                f["scenario"].as_str().unwrap_or(""),
                f["figure"].as_str().unwrap_or(""),
                labels,
                f["value"],
                f["unit"].as_str().unwrap_or("")
            ));
        }
        out
    }
}
