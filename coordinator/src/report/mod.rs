//! The campaign report: one self-contained HTML file (inline CSS and SVG, no script, nothing
//! fetched) rendered from a campaign's `status --json` object, so the coordinator's
//! `GET /campaigns/ID/report`, `coordinator report ID --out FILE` and `demo` all show the same
//! thing. Each section appears when its data exists: search candidates
//! (`rounds[i].candidates`), MT-Bench scores (`metrics.judge.mtbench`) and a ranking
//! (`ranking`, or `metrics.judge.ranking` of a round) light up when a campaign reports them.

pub mod charts;

use std::fmt::Write as _;

use serde_json::Value;

use charts::{palette, Axes, Bar, Estimate, Series};

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "–".to_string(), |x| format!("{x:.digits$}"))
}

fn fmt_params(p: Option<f64>) -> String {
    match p {
        Some(p) if p >= 1e9 => format!("{:.2} B", p / 1e9),
        Some(p) if p >= 1e6 => format!("{:.2} M", p / 1e6),
        Some(p) if p >= 1e3 => format!("{:.1} k", p / 1e3),
        Some(p) => format!("{p:.0}"),
        None => "–".into(),
    }
}

/// A task's progress series: `(time_ms, metrics)` per point.
fn series_of<'a>(task: &'a Value) -> impl Iterator<Item = (f64, &'a Value)> + 'a {
    task["progress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((num(&p["time_ms"])?, &p["metrics"])))
}

fn curve(task: &Value, x: &str, y: &str) -> Vec<(f64, f64)> {
    series_of(task)
        .filter_map(|(_, m)| Some((num(&m[x])?, num(&m[y])?)))
        .collect()
}

/// A chart wrapped in a figure whose attributes say what it plots (the tests read them), with
/// the legend of its series.
fn figure(out: &mut String, id: &str, points: usize, svg: Result<String, String>) {
    figure_with(out, id, points, svg, &[]);
}

fn legend_of(series: &[Series]) -> Vec<(String, plotters::style::RGBColor)> {
    series.iter().map(|s| (s.name.clone(), s.color)).collect()
}

fn figure_with(
    out: &mut String,
    id: &str,
    points: usize,
    svg: Result<String, String>,
    legend: &[(String, plotters::style::RGBColor)],
) {
    match svg {
        Ok(svg) => {
            let _ = writeln!(
                out,
                "<figure class=\"chart\" id=\"chart-{}\" data-points=\"{points}\">{svg}{}</figure>",
                esc(id),
                if legend.is_empty() {
                    String::new()
                } else {
                    charts::legend_html(legend)
                }
            );
        }
        Err(e) => {
            let _ = writeln!(
                out,
                "<p class=\"note\">chart {}: not drawn ({})</p>",
                esc(id),
                esc(&e)
            );
        }
    }
}

/// The shape a round's prune reported (`metrics.shape.*`) or its spec target.
fn shape_text(r: &Value, key: &str) -> String {
    let m = &r["metrics"][key];
    let t = if key == "shape" {
        &r["target"]
    } else {
        &Value::Null
    };
    let get = |k: &str| {
        num(&m[k])
            .or_else(|| num(&t[k]).filter(|v| *v > 0.0))
            .map_or("?".to_string(), |v| format!("{v:.0}"))
    };
    if m.is_null() && t.is_null() {
        return "–".into();
    }
    format!(
        "h {} · ffn {} · heads {} · layers {}",
        get("hidden_size"),
        get("intermediate_size"),
        get("num_attention_heads"),
        get("num_layers")
    )
}

fn round_params(r: &Value) -> Option<f64> {
    num(&r["params"]).or_else(|| num(&r["metrics"]["params"]))
}

fn teacher_params(c: &Value) -> Option<f64> {
    let rounds = c["rounds"].as_array()?;
    num(&rounds.first()?["metrics"]["source"]["params"])
}

fn teacher_ppl(c: &Value) -> Option<f64> {
    c["rounds"]
        .as_array()?
        .iter()
        .find_map(|r| num(&r["metrics"]["teacher_perplexity"]))
}

/// The ranking where the campaign reports one: `ranking` at the top or `metrics.judge.ranking`
/// of the last round that has it (the judge's `judge.ranking.<model>.{elo, ci_low, ci_high}`,
/// nested: an object by model name); also a list of `{model|name, rating|elo|score, ci_low,
/// ci_high}`.
fn ranking(c: &Value) -> Vec<Estimate> {
    let found = [&c["ranking"], &c["judge"]["ranking"]]
        .into_iter()
        .chain(
            c["rounds"]
                .as_array()
                .into_iter()
                .flatten()
                .rev()
                .map(|r| &r["metrics"]["judge"]["ranking"]),
        )
        .find(|v| v.is_array() || v.is_object());
    let Some(v) = found else {
        return Vec::new();
    };
    let row = |name: String, e: &Value| {
        let value = ["rating", "elo", "score", "strength"]
            .iter()
            .find_map(|k| num(&e[*k]))
            .or_else(|| num(e))?;
        Some(Estimate {
            name,
            value,
            low: num(&e["ci_low"]).unwrap_or(value),
            high: num(&e["ci_high"]).unwrap_or(value),
        })
    };
    let mut rows: Vec<Estimate> = match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|e| {
                let name = ["model", "name", "id"]
                    .iter()
                    .find_map(|k| e[*k].as_str().map(str::to_string))
                    .or_else(|| e["round"].as_u64().map(|r| format!("round {r}")))?;
                row(name, e)
            })
            .collect(),
        Value::Object(o) => o.iter().filter_map(|(k, e)| row(k.clone(), e)).collect(),
        _ => Vec::new(),
    };
    rows.sort_by(|a, b| a.value.total_cmp(&b.value));
    rows
}

/// Renders the report of one campaign (`status --json` object).
pub fn render(c: &Value) -> String {
    let mut o = String::new();
    let name = c["name"].as_str().unwrap_or("campaign");
    let id = c["id"].as_str().unwrap_or("?");
    let state = c["state"].as_str().unwrap_or("?");
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Distillery · {} ({})</title><style>{}</style></head><body>\n",
        esc(name),
        esc(id),
        CSS
    );
    let _ = writeln!(
        o,
        "<header><h1>{} <span class=\"id\">{}</span> <span class=\"state state-{}\">{}</span></h1>",
        esc(name),
        esc(id),
        esc(state),
        esc(state)
    );
    let rounds: Vec<&Value> = c["rounds"].as_array().into_iter().flatten().collect();
    let student = rounds
        .iter()
        .rev()
        .find_map(|r| r["artifacts"]["student"].as_str());
    let t = &c["tasks"];
    let _ = writeln!(
        o,
        "<p>{} round(s) · tasks: {} succeeded, {} running, {} pending, {} failed · retries {} · latest student <code>{}</code></p>",
        rounds.len(),
        t["succeeded"].as_u64().unwrap_or(0),
        t["leased"].as_u64().unwrap_or(0),
        t["pending"].as_u64().unwrap_or(0),
        t["failed"].as_u64().unwrap_or(0),
        c["retries"].as_u64().unwrap_or(0),
        esc(student.unwrap_or("none yet")),
    );
    if let Some(e) = c["error"].as_str() {
        let _ = writeln!(o, "<p class=\"error\">error: {}</p>", esc(e));
    }
    o.push_str("</header>\n");

    frontier_section(&mut o, c, &rounds);
    rounds_section(&mut o, c, &rounds);
    candidates_section(&mut o, &rounds);
    distill_section(&mut o, &rounds);
    judge_section(&mut o, c, &rounds);
    gate_section(&mut o, &rounds);
    timeline_section(&mut o, c, &rounds);
    o.push_str(
        "<footer>Rendered by the Distillery coordinator from <code>status --json</code>.</footer>\n</body></html>\n",
    );
    o
}

fn frontier_section(o: &mut String, c: &Value, rounds: &[&Value]) {
    let tp = teacher_params(c);
    let tppl = teacher_ppl(c);
    let mut students = Vec::new();
    let mut labels = Vec::new();
    for r in rounds {
        if let (Some(p), Some(ppl)) = (round_params(r), num(&r["metrics"]["perplexity"])) {
            students.push((p / 1e6, ppl));
            labels.push(format!("round {}", r["index"].as_u64().unwrap_or(0)));
        }
    }
    let mut cands = Vec::new();
    for r in rounds {
        for k in r["candidates"].as_array().into_iter().flatten() {
            let p = num(&k["params"]);
            let ppl = num(&k["perplexity"]).or_else(|| num(&k["metrics"]["perplexity"]));
            if let (Some(p), Some(ppl)) = (p, ppl) {
                cands.push((p / 1e6, ppl));
            }
        }
    }
    if students.is_empty() && tppl.is_none() {
        return;
    }
    o.push_str("<section id=\"frontier\"><h2>Size and quality</h2>\n");
    o.push_str("<p>Validation perplexity against parameters: the teacher, every round's student (and its pruned model before distillation, where measured); search candidates where they carry a perplexity (their validation scores have their own section). Lower and further left is better.</p>\n");
    let mut series = Vec::new();
    if let (Some(p), Some(ppl)) = (tp, tppl) {
        // The path from the teacher through each round, in the order the rounds ran.
        let mut path = vec![(p / 1e6, ppl)];
        path.extend(students.iter().copied());
        let mut s = Series::line("teacher → students", palette::STUDENT, path);
        s.labels = std::iter::once("teacher".to_string())
            .chain(labels.iter().cloned())
            .collect();
        series.push(s);
        series.push(Series {
            name: "teacher".into(),
            color: palette::TEACHER,
            points: vec![(p / 1e6, ppl)],
            line: false,
            labels: Vec::new(),
            intervals: Vec::new(),
        });
    } else if !students.is_empty() {
        let mut s = Series::line("students", palette::STUDENT, students.clone());
        s.labels = labels.clone();
        s.line = students.len() > 1;
        series.push(s);
    }
    // Where a round's pruned model was measured before its distillation (the demo does).
    let (pruned, pruned_labels): (Vec<(f64, f64)>, Vec<String>) = rounds
        .iter()
        .filter_map(|r| {
            Some((
                (
                    round_params(r)? / 1e6,
                    num(&r["metrics"]["pruned_perplexity"])?,
                ),
                format!("round {} pruned", r["index"].as_u64().unwrap_or(0)),
            ))
        })
        .unzip();
    if !pruned.is_empty() {
        series.push(Series {
            name: "pruned, before distillation".into(),
            color: palette::PRUNED,
            points: pruned,
            line: false,
            labels: pruned_labels,
            intervals: Vec::new(),
        });
    }
    if !cands.is_empty() {
        series.push(Series {
            name: "search candidates".into(),
            color: palette::CANDIDATE,
            points: cands.clone(),
            line: false,
            labels: Vec::new(),
            intervals: Vec::new(),
        });
    }
    let n: usize = series.iter().map(|s| s.points.len()).sum();
    // The teacher's own entry first in the legend, then the path and the rest.
    let mut legend = legend_of(&series);
    legend.retain(|(n, _)| n != "teacher");
    if tp.is_some() && tppl.is_some() {
        legend.insert(0, ("teacher".into(), palette::TEACHER));
    }
    figure_with(
        o,
        "frontier",
        n,
        charts::xy(
            &Axes {
                title: "perplexity vs parameters",
                x: "parameters (millions)",
                y: "validation perplexity",
                width: 640,
                height: 400,
            },
            &series,
            false,
        ),
        &legend,
    );
    // Judge score against parameters: win rate against the baseline with its interval, or the
    // MT-Bench overall score where the campaign graded that way.
    let mut wr = Vec::new();
    let mut ci = Vec::new();
    let mut wl = Vec::new();
    let mut mt = Vec::new();
    for r in rounds {
        let j = &r["metrics"]["judge"];
        let Some(p) = round_params(r) else { continue };
        // A round whose judge decided nothing (all ties) has no win rate to plot.
        let decided = num(&j["wins"]).unwrap_or(0.0) + num(&j["losses"]).unwrap_or(0.0) > 0.0
            || num(&j["wins"]).is_none();
        if let Some(w) = num(&j["win_rate"]).filter(|_| decided) {
            wr.push((p / 1e6, w));
            ci.push((
                num(&j["ci_low"]).unwrap_or(w),
                num(&j["ci_high"]).unwrap_or(w),
            ));
            wl.push(format!("round {}", r["index"].as_u64().unwrap_or(0)));
        }
        if let Some(m) = num(&j["mtbench"]["overall"]) {
            mt.push((p / 1e6, m));
        }
    }
    if !wr.is_empty() {
        let s = Series {
            name: "win rate vs teacher (95% CI)".into(),
            color: palette::KL,
            points: wr,
            line: false,
            labels: wl,
            intervals: ci,
        };
        let n = s.points.len();
        let legend = legend_of(std::slice::from_ref(&s));
        figure_with(
            o,
            "judge-vs-params",
            n,
            charts::xy(
                &Axes {
                    title: "judge: win rate vs parameters",
                    x: "parameters (millions)",
                    y: "win rate (ties count half)",
                    width: 640,
                    height: 400,
                },
                &[s],
                true,
            ),
            &legend,
        );
    }
    if !mt.is_empty() {
        let n = mt.len();
        let mut s = Series::line("MT-Bench overall", palette::LOSS, mt);
        s.line = n > 1;
        figure(
            o,
            "mtbench-vs-params",
            n,
            charts::xy(
                &Axes {
                    title: "MT-Bench score vs parameters",
                    x: "parameters (millions)",
                    y: "score (1–10)",
                    width: 640,
                    height: 400,
                },
                &[s],
                true,
            ),
        );
    }
    o.push_str("</section>\n");
}

fn rounds_section(o: &mut String, c: &Value, rounds: &[&Value]) {
    if rounds.is_empty() {
        return;
    }
    o.push_str("<section id=\"rounds\"><h2>Rounds</h2>\n<table><thead><tr><th>round</th><th>state</th><th>phase</th><th>shape</th><th>parameters</th><th>kept</th><th>perplexity pruned</th><th>perplexity</th><th>× teacher</th><th>distilled tokens</th><th>tok/s</th><th>extensions</th></tr></thead><tbody>\n");
    let tppl = teacher_ppl(c);
    if let (Some(p), Some(t)) = (teacher_params(c), tppl) {
        let shape = rounds
            .first()
            .map(|r| shape_text(r, "source"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "<tr class=\"teacher\"><td>teacher</td><td></td><td></td><td>{}</td><td>{}</td><td>100%</td><td></td><td>{t:.2}</td><td>1.00</td><td></td><td></td><td></td></tr>",
            esc(&shape),
            fmt_params(Some(p))
        );
    }
    for r in rounds {
        let m = &r["metrics"];
        let p = round_params(r);
        let src = num(&m["source"]["params"]);
        let kept = match (p, src) {
            (Some(p), Some(s)) if s > 0.0 => {
                format!("{:.0}% of {}", 100.0 * p / s, fmt_params(Some(s)))
            }
            _ => "–".into(),
        };
        let ppl = num(&m["perplexity"]);
        let ratio = ppl
            .zip(num(&m["teacher_perplexity"]).or(tppl))
            .map(|(a, b)| a / b);
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            r["index"].as_u64().unwrap_or(0),
            esc(r["state"].as_str().unwrap_or("")),
            esc(r["phase"].as_str().unwrap_or("")),
            esc(&shape_text(r, "shape")),
            fmt_params(p),
            esc(&kept),
            fmt_opt(num(&m["pruned_perplexity"]), 2),
            fmt_opt(ppl, 2),
            fmt_opt(ratio, 2),
            fmt_opt(num(&m["distill"]["tokens"]), 0),
            fmt_opt(num(&m["distill"]["tokens_per_s"]), 0),
            r["extensions"].as_u64().unwrap_or(0),
        );
    }
    o.push_str("</tbody></table></section>\n");
}

fn candidates_section(o: &mut String, rounds: &[&Value]) {
    let any = rounds
        .iter()
        .any(|r| r["candidates"].as_array().is_some_and(|a| !a.is_empty()));
    if !any {
        return;
    }
    o.push_str("<section id=\"candidates\"><h2>Search candidates</h2>\n<p>Each candidate shape was distilled briefly and scored on validation; the winner's distillation continued.</p>\n");
    for r in rounds {
        let Some(cands) = r["candidates"].as_array().filter(|a| !a.is_empty()) else {
            continue;
        };
        let idx = r["index"].as_u64().unwrap_or(0);
        let _ = writeln!(o, "<h3>round {idx}</h3><table><thead><tr><th>#</th><th>shape</th><th>parameters</th><th>tokens</th><th>score</th><th></th></tr></thead><tbody>");
        let mut pts = Vec::new();
        let mut win = Vec::new();
        for (i, k) in cands.iter().enumerate() {
            let s = &k["shape"];
            let shape = if s.is_object() {
                let g = |n: &str| num(&s[n]).map_or("?".into(), |v| format!("{v:.0}"));
                format!(
                    "h {} · ffn {} · heads {} · layers {}",
                    g("hidden_size"),
                    g("intermediate_size"),
                    g("num_attention_heads"),
                    g("num_layers")
                )
            } else {
                s.as_str().unwrap_or("–").to_string()
            };
            let winner = k["winner"].as_bool().unwrap_or(false);
            let _ = writeln!(
                o,
                "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if winner { " class=\"winner\"" } else { "" },
                k["index"].as_u64().unwrap_or(i as u64),
                esc(&shape),
                fmt_params(num(&k["params"])),
                fmt_opt(num(&k["tokens"]), 0),
                fmt_opt(num(&k["score"]), 4),
                if winner { "winner" } else { "" }
            );
            if let (Some(p), Some(sc)) = (num(&k["params"]), num(&k["score"])) {
                if winner {
                    win.push((p / 1e6, sc));
                } else {
                    pts.push((p / 1e6, sc));
                }
            }
        }
        o.push_str("</tbody></table>\n");
        let mut series = Vec::new();
        for (name, color, points) in [
            ("candidates", palette::CANDIDATE, pts),
            ("winner", palette::STUDENT, win),
        ] {
            if !points.is_empty() {
                series.push(Series {
                    name: name.into(),
                    color,
                    points,
                    line: false,
                    labels: Vec::new(),
                    intervals: Vec::new(),
                });
            }
        }
        let n = series.iter().map(|s| s.points.len()).sum();
        let legend = legend_of(&series);
        figure_with(
            o,
            &format!("candidates-{idx}"),
            n,
            charts::xy(
                &Axes {
                    title: "candidate score vs parameters",
                    x: "parameters (millions)",
                    y: "validation score (lower is better)",
                    width: 560,
                    height: 340,
                },
                &series,
                false,
            ),
            &legend,
        );
    }
    o.push_str("</section>\n");
}

fn distill_section(o: &mut String, rounds: &[&Value]) {
    let tasks: Vec<(&Value, &Value)> = rounds
        .iter()
        .flat_map(|r| {
            r["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                // Distillations, and any task that reports the same curves (a search
                // candidate's short distillation, a teacher correction).
                .filter(|t| !curve(t, "distill.step", "distill.loss").is_empty())
                .map(move |t| (*r, t))
        })
        .collect();
    if tasks.is_empty() {
        return;
    }
    o.push_str("<section id=\"distill\"><h2>Distillation</h2>\n");
    for (r, t) in tasks {
        let tid = t["id"].as_str().unwrap_or("?");
        let none = Value::Null;
        let m = if t["kind"].as_str() == Some("distill") {
            &r["metrics"]["distill"]
        } else {
            &none
        };
        let _ = writeln!(
            o,
            "<h3>round {} · {} task {} · {} rank(s)</h3><p>{} steps, {} tokens, final loss {}, {} tok/s overall</p><div class=\"row\">",
            r["index"].as_u64().unwrap_or(0),
            esc(t["kind"].as_str().unwrap_or("")),
            esc(tid),
            t["world_size"].as_u64().unwrap_or(1),
            fmt_opt(num(&m["steps"]), 0),
            fmt_opt(num(&m["tokens"]), 0),
            fmt_opt(num(&m["final_loss"]), 4),
            fmt_opt(num(&m["tokens_per_s"]), 0),
        );
        let loss = curve(t, "distill.step", "distill.loss");
        let kl = curve(t, "distill.step", "distill.kl");
        let mut s = vec![Series::line("loss", palette::LOSS, loss)];
        if !kl.is_empty() {
            s.push(Series::line("KL (T²-scaled)", palette::KL, kl));
        }
        let n = s.iter().map(|s| s.points.len()).sum();
        let small = |title| Axes {
            title,
            x: "step",
            y: "",
            width: 420,
            height: 300,
        };
        figure_with(
            o,
            &format!("loss-{tid}"),
            n,
            charts::xy(&small("loss and KL"), &s, false),
            &legend_of(&s),
        );
        let lr = curve(t, "distill.step", "distill.lr");
        if !lr.is_empty() {
            let n = lr.len();
            figure(
                o,
                &format!("lr-{tid}"),
                n,
                charts::xy(
                    &small("learning rate"),
                    &[Series::line("lr", palette::LR, lr)],
                    true,
                ),
            );
        }
        let tps = curve(t, "distill.step", "distill.tokens_per_s");
        if !tps.is_empty() {
            let n = tps.len();
            figure(
                o,
                &format!("tps-{tid}"),
                n,
                charts::xy(
                    &small("tokens per second"),
                    &[Series::line("tok/s", palette::THROUGHPUT, tps)],
                    true,
                ),
            );
        }
        o.push_str("</div>\n");
    }
    o.push_str("</section>\n");
}

fn judge_section(o: &mut String, c: &Value, rounds: &[&Value]) {
    let judged: Vec<&&Value> = rounds
        .iter()
        .filter(|r| {
            let j = &r["metrics"]["judge"];
            num(&j["wins"]).is_some() || num(&j["win_rate"]).is_some() || j["mtbench"].is_object()
        })
        .collect();
    let rank = ranking(c);
    if judged.is_empty() && rank.is_empty() {
        return;
    }
    o.push_str("<section id=\"judge\"><h2>Judge</h2>\n");
    if !judged.is_empty() {
        let mtbench = judged
            .iter()
            .any(|r| r["metrics"]["judge"]["mtbench"].is_object());
        // The label the status gives the judge's mode, else what the figures are by default.
        let label = judged
            .iter()
            .find_map(|r| r["metrics"]["judge"]["comparability"].as_str());
        if let Some(l) = label {
            let _ = writeln!(o, "<p class=\"note\">Judge: {}.</p>", esc(l));
        } else if !mtbench {
            o.push_str("<p class=\"note\">Pairwise against the baseline, both orders (a disagreement is a tie): not comparable with published MT-Bench.</p>\n");
        }
        o.push_str("<table><thead><tr><th>round</th><th>wins / ties / losses</th><th>win rate</th><th>95% interval</th><th>position consistency</th><th>unparsed</th><th>mean chars winner / loser</th><th>MT-Bench turn 1 / 2 / overall</th></tr></thead><tbody>\n");
        for r in &judged {
            let j = &r["metrics"]["judge"];
            let mt = &j["mtbench"];
            let (w, t, l) = (num(&j["wins"]), num(&j["ties"]), num(&j["losses"]));
            // All ties: the judge preferred nothing, which is no win rate of 0.5.
            let no_verdict =
                matches!((w, t, l), (Some(w), Some(t), Some(l)) if w + l == 0.0 && t > 0.0);
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{} / {} / {}</td><td>{}</td><td>[{}, {}]</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td></tr>",
                r["index"].as_u64().unwrap_or(0),
                fmt_opt(w, 0),
                fmt_opt(t, 0),
                fmt_opt(l, 0),
                if no_verdict {
                    "none".to_string()
                } else {
                    fmt_opt(num(&j["win_rate"]), 3)
                },
                if no_verdict {
                    "–".to_string()
                } else {
                    fmt_opt(num(&j["ci_low"]), 3)
                },
                if no_verdict {
                    "–".to_string()
                } else {
                    fmt_opt(num(&j["ci_high"]), 3)
                },
                fmt_opt(num(&j["position_consistency"]), 3),
                fmt_opt(num(&j["unparsed"]), 0),
                fmt_opt(num(&j["winner_mean_chars"]), 0),
                fmt_opt(num(&j["loser_mean_chars"]), 0),
                if mt.is_object() {
                    format!(
                        "{} / {} / {}",
                        fmt_opt(num(&mt["turn1"]), 2),
                        fmt_opt(num(&mt["turn2"]), 2),
                        fmt_opt(num(&mt["overall"]), 2)
                    )
                } else {
                    "–".into()
                },
            );
            // Say so when the judge could not tell the answers apart: all ties is not a result.
            if let (Some(w), Some(t), Some(l)) = (w, t, l) {
                if w + l == 0.0 && t > 0.0 {
                    let _ = writeln!(
                        o,
                        "<tr><td></td><td colspan=\"7\" class=\"note\">every judgment was a tie: the judge could not tell the student's answers from the baseline's (at this size it cannot judge; use a stronger judge)</td></tr>"
                    );
                }
            }
        }
        o.push_str("</tbody></table>\n");
    }
    if !rank.is_empty() {
        o.push_str("<h3>Ranking</h3>\n<table><thead><tr><th>model</th><th>rating</th><th>95% interval</th></tr></thead><tbody>\n");
        for e in rank.iter().rev() {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{:.0}</td><td>[{:.0}, {:.0}]</td></tr>",
                esc(&e.name),
                e.value,
                e.low,
                e.high
            );
        }
        o.push_str("</tbody></table>\n");
        figure(
            o,
            "ranking",
            rank.len(),
            charts::intervals(
                "Bradley–Terry ranking (teacher = 1000)",
                "rating",
                &rank,
                palette::KL,
                640,
            ),
        );
    }
    o.push_str("</section>\n");
}

fn gate_section(o: &mut String, rounds: &[&Value]) {
    let any = rounds
        .iter()
        .any(|r| r["gate"].as_array().is_some_and(|g| !g.is_empty()));
    if !any {
        return;
    }
    o.push_str("<section id=\"gate\"><h2>Gate decisions</h2>\n<table><thead><tr><th>round</th><th>decision</th><th>why</th></tr></thead><tbody>\n");
    for r in rounds {
        for g in r["gate"].as_array().into_iter().flatten() {
            let d = g["decision"].as_str().unwrap_or("?");
            let _ = writeln!(
                o,
                "<tr class=\"gate-{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(d),
                r["index"].as_u64().unwrap_or(0),
                esc(d),
                esc(g["reason"].as_str().unwrap_or(""))
            );
        }
    }
    o.push_str("</tbody></table></section>\n");
}

fn timeline_section(o: &mut String, c: &Value, rounds: &[&Value]) {
    let tasks: Vec<&Value> = rounds
        .iter()
        .flat_map(|r| r["tasks"].as_array().into_iter().flatten())
        .collect();
    let attempts: Vec<(&Value, &Value)> = tasks
        .iter()
        .flat_map(|t| {
            t["attempt_log"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |a| (*t, a))
        })
        .collect();
    if tasks.is_empty() {
        return;
    }
    o.push_str("<section id=\"tasks\"><h2>Tasks</h2>\n");
    if !attempts.is_empty() {
        let t0 = num(&c["created_ms"])
            .or_else(|| {
                attempts
                    .iter()
                    .filter_map(|(_, a)| num(&a["start_ms"]))
                    .reduce(f64::min)
            })
            .unwrap_or(0.0);
        let now = num(&c["updated_ms"]).unwrap_or(t0);
        let mut lanes: Vec<String> = Vec::new();
        let mut kinds: Vec<String> = Vec::new();
        let mut bars = Vec::new();
        for (t, a) in &attempts {
            let kind = t["kind"].as_str().unwrap_or("?").to_string();
            let ki = kinds.iter().position(|k| *k == kind).unwrap_or_else(|| {
                kinds.push(kind.clone());
                kinds.len() - 1
            });
            let start = (num(&a["start_ms"]).unwrap_or(t0) - t0) / 1e3;
            let end = (num(&a["end_ms"]).unwrap_or(now) - t0) / 1e3;
            let outline = match a["outcome"].as_str() {
                Some("failed") => Some(palette::FAILED),
                Some("lost") | Some("revoked") => Some(palette::LOST),
                _ => None,
            };
            let workers = a["workers"].as_array().cloned().unwrap_or_default();
            let hosts = a["hosts"].as_array().cloned().unwrap_or_default();
            for (i, w) in workers.iter().enumerate() {
                let host = hosts.get(i).and_then(Value::as_str).unwrap_or("");
                let wid = w.as_str().unwrap_or("?");
                let lane = if host.is_empty() {
                    wid.to_string()
                } else {
                    format!("{host} ({wid})")
                };
                let li = lanes.iter().position(|l| *l == lane).unwrap_or_else(|| {
                    lanes.push(lane.clone());
                    lanes.len() - 1
                });
                bars.push(Bar {
                    lane: li,
                    start,
                    end,
                    color: palette::KINDS[ki % palette::KINDS.len()],
                    outline,
                });
            }
        }
        o.push_str("<p>Each bar is one attempt on one worker, coloured by task kind; a red outline marks a failed attempt, a yellow one an attempt lost (lease expired, worker gone) or revoked.</p>\n");
        let legend: Vec<(String, plotters::style::RGBColor)> = kinds
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), palette::KINDS[i % palette::KINDS.len()]))
            .collect();
        let n = bars.len();
        figure_with(
            o,
            "timeline",
            n,
            charts::timeline("tasks per worker", &lanes, &bars, 1240),
            &legend,
        );
    }
    o.push_str("<details><summary>every task</summary><table><thead><tr><th>task</th><th>round</th><th>phase</th><th>kind</th><th>state</th><th>ranks</th><th>attempts</th><th>failed</th><th>lost</th><th>last error</th></tr></thead><tbody>\n");
    for t in &tasks {
        let _ = writeln!(
            o,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if t["failed"].as_u64().unwrap_or(0) + t["lost"].as_u64().unwrap_or(0) > 0 {
                " class=\"troubled\""
            } else {
                ""
            },
            esc(t["id"].as_str().unwrap_or("")),
            t["round"].as_u64().unwrap_or(0),
            esc(t["phase"].as_str().unwrap_or("")),
            esc(t["kind"].as_str().unwrap_or("")),
            esc(t["state"].as_str().unwrap_or("")),
            t["world_size"].as_u64().unwrap_or(1),
            t["attempts"].as_u64().unwrap_or(0),
            t["failed"].as_u64().unwrap_or(0),
            t["lost"].as_u64().unwrap_or(0),
            esc(t["error"].as_str().unwrap_or("")),
        );
    }
    o.push_str("</tbody></table></details></section>\n");
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1320px;color:#222;padding:0 16px}\
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}h3{font-size:15px}\
.id{color:#888;font-weight:normal}.state{font-size:13px;padding:2px 8px;border-radius:10px;background:#eee;vertical-align:middle}\
.state-succeeded{background:#d4f4dd}.state-failed{background:#fbd5d5}.state-running{background:#dbeafe}\
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:right}\
th{background:#f6f6f6}td:first-child,th:first-child{text-align:left}tr.teacher td{background:#fff4e8}tr.winner td{background:#e8f6e8}\
tr.troubled td{background:#fff0f0}tr.gate-stop td{background:#fbd5d5}tr.gate-extend td{background:#fff7d6}\
.note{color:#8a5a00}.error{color:#b00}figure.chart{display:inline-block;margin:8px 12px 8px 0}.row{display:flex;flex-wrap:wrap}\
code{font-size:12px}.legend{text-align:center;margin-top:2px}.legend span{margin-right:14px;font-size:13px}.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle;opacity:.7}footer{margin-top:40px;color:#888;font-size:12px}";

#[cfg(test)]
mod tests;
