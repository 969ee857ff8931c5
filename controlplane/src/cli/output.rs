//! kubectl-style output: an aligned table for people, JSON or YAML for programs.

use serde_json::Value;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Rows to print: column headers and cells for the table, a JSON value for the others.
pub struct Listing {
    pub columns: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub value: Value,
}

/// Renders an aligned table.
pub fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(columns.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

impl Listing {
    /// Renders in `format`.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table if self.rows.is_empty() => "No resources found.\n".to_string(),
            Format::Table => table(&self.columns, &self.rows),
            Format::Json => serde_json::to_string_pretty(&self.value).unwrap_or_default() + "\n",
            Format::Yaml => serde_saphyr::to_string(&self.value).unwrap_or_default(),
        }
    }
}

/// A relative age or remaining time, like kubectl: `45s`, `12m`, `3h`, `5d`.
pub fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["NAME", "X"], &[vec!["a".into(), "1".into()], vec!["long-name".into(), "22".into()]]);
        assert_eq!(t, "NAME        X\na           1\nlong-name   22\n");
    }

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(86_400), "24h");
        assert_eq!(human_duration(864_000), "10d");
    }
}
