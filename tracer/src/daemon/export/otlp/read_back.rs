//! Reading back the daemon's own OpenMetrics exposition into families of samples. OTLP is a
//! second encoding of the same scrape: one collector computes every value and applies every
//! cardinality bound, and both formats carry what it wrote.

/// A metric family's kind, as its `# TYPE` line says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Counter,
    Gauge,
    Histogram,
    Info,
}

/// One family: its name (without sample suffixes), help and series.
#[derive(Debug, PartialEq)]
pub(super) struct Family {
    pub(super) name: String,
    pub(super) help: String,
    pub(super) kind: Kind,
    pub(super) series: Vec<Series>,
}

/// One label set's value.
#[derive(Debug, PartialEq)]
pub(super) struct Series {
    pub(super) labels: Vec<(String, String)>,
    pub(super) value: Value,
}

#[derive(Debug, PartialEq)]
pub(super) enum Value {
    Number(f64),
    /// Cumulative counts at each upper bound (`+Inf` last), the sum and the count.
    Histogram {
        buckets: Vec<(f64, u64)>,
        sum: f64,
        count: u64,
    },
}

/// The families of an OpenMetrics text, in order. Lines this encoder never writes are an
/// error: they would mean the exposition changed under the reader.
pub(super) fn parse(text: &str) -> Result<Vec<Family>, String> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if line == "# EOF" || line.is_empty() || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name: name.to_owned(),
                help: unescape(help),
                kind: Kind::Gauge,
                series: Vec::new(),
            });
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| format!("bad line `{line}`"))?;
            let kind = match kind {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                "info" => Kind::Info,
                other => return Err(format!("family {name} of unexpected type {other}")),
            };
            match families.last_mut() {
                Some(family) if family.name == name => family.kind = kind,
                _ => families.push(Family {
                    name: name.to_owned(),
                    help: String::new(),
                    kind,
                    series: Vec::new(),
                }),
            }
            continue;
        }
        let family =
            families.last_mut().ok_or_else(|| format!("sample before a family: `{line}`"))?;
        add_sample(family, line)?;
    }
    Ok(families)
}

fn add_sample(family: &mut Family, line: &str) -> Result<(), String> {
    let (sample_name, labels, value) = split_sample(line)?;
    let suffix = sample_name
        .strip_prefix(family.name.as_str())
        .ok_or_else(|| format!("sample {sample_name} in family {}", family.name))?;
    let number = parse_number(value).ok_or_else(|| format!("bad value in `{line}`"))?;
    match (family.kind, suffix) {
        (Kind::Counter, "_total") | (Kind::Gauge, "") | (Kind::Info, "_info") => {
            family.series.push(Series { labels, value: Value::Number(number) });
        }
        (Kind::Histogram, "_bucket" | "_sum" | "_count") => {
            let mut labels = labels;
            let le = labels.iter().position(|(name, _)| name == "le").map(|i| labels.remove(i));
            let at = match family.series.iter().position(|s| s.labels == labels) {
                Some(at) => at,
                None => {
                    family.series.push(Series {
                        labels,
                        value: Value::Histogram { buckets: Vec::new(), sum: 0.0, count: 0 },
                    });
                    family.series.len() - 1
                }
            };
            let Value::Histogram { buckets, sum, count } = &mut family.series[at].value else {
                unreachable!("histogram families hold histogram series")
            };
            match (suffix, le) {
                ("_bucket", Some((_, le))) => {
                    let bound = parse_number(&le).ok_or_else(|| format!("bad le in `{line}`"))?;
                    buckets.push((bound, number as u64));
                }
                ("_sum", None) => *sum = number,
                ("_count", None) => *count = number as u64,
                _ => return Err(format!("unexpected histogram sample `{line}`")),
            }
        }
        _ => return Err(format!("unexpected sample {sample_name} in family {}", family.name)),
    }
    Ok(())
}

/// A sample line's parts: its name, its labels (values unescaped) and its value.
type SampleParts<'a> = (&'a str, Vec<(String, String)>, &'a str);

/// `name{a="x",b="y"} value` into its parts.
fn split_sample(line: &str) -> Result<SampleParts<'_>, String> {
    let bad = || format!("bad sample `{line}`");
    let Some(open) = line.find('{') else {
        let (name, value) = line.split_once(' ').ok_or_else(bad)?;
        return Ok((name, Vec::new(), value.trim()));
    };
    let name = &line[..open];
    let mut labels = Vec::new();
    let mut rest = &line[open + 1..];
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((name, labels, after.trim()));
        }
        let rest_after_comma = rest.strip_prefix(',').unwrap_or(rest);
        let (label, after) = rest_after_comma.split_once("=\"").ok_or_else(bad)?;
        let (value, after) = quoted(after).ok_or_else(bad)?;
        labels.push((label.to_owned(), value));
        rest = after;
    }
}

/// The value up to the closing quote, unescaped, and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            c => value.push(c),
        }
    }
    None
}

fn unescape(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\\\", "\\")
}

fn parse_number(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        text => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_kind() {
        let text = "# HELP x_events Events seen.\n# TYPE x_events counter\n\
                    x_events_total{cause=\"a \\\"b\\\", c=d\"} 3\n\
                    # HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n\
                    # HELP x_wait Waits.\n# TYPE x_wait histogram\n# UNIT x_wait seconds\n\
                    x_wait_sum{state=\"A\"} 0.5\nx_wait_count{state=\"A\"} 2\n\
                    x_wait_bucket{le=\"0.1\",state=\"A\"} 1\nx_wait_bucket{le=\"+Inf\",state=\"A\"} 2\n\
                    # HELP x_build Build.\n# TYPE x_build info\nx_build_info{version=\"1\"} 1\n# EOF\n";
        let families = parse(text).unwrap();
        assert_eq!(families.len(), 4);
        assert_eq!(families[0].help, "Events seen.");
        assert_eq!(
            families[0].series,
            [Series {
                labels: vec![("cause".to_owned(), "a \"b\", c=d".to_owned())],
                value: Value::Number(3.0)
            }]
        );
        assert_eq!(families[1].series[0].value, Value::Number(1.0));
        assert_eq!(
            families[2].series,
            [Series {
                labels: vec![("state".to_owned(), "A".to_owned())],
                value: Value::Histogram {
                    buckets: vec![(0.1, 1), (f64::INFINITY, 2)],
                    sum: 0.5,
                    count: 2
                }
            }]
        );
        assert_eq!(families[3].kind, Kind::Info);
    }

    #[test]
    fn an_unexpected_line_is_an_error() {
        assert!(parse("# HELP a A.\n# TYPE a summary\n").is_err());
        assert!(parse("# HELP a A.\n# TYPE a counter\nb_total 1\n").is_err());
        assert!(parse("# HELP a A.\n# TYPE a gauge\na{x=\"1} 1\n").is_err());
    }
}
