//! The `contended --sweep` chart: ops/s against workers, Baton and the peer, as SVG (plotters'
//! SVG backend; text is laid out by plotters' built-in estimate, so no system fonts are
//! needed).

use std::path::Path;

use plotters::prelude::*;

/// One worker count's result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Point {
    pub(crate) workers: u64,
    pub(crate) ours: f64,
    pub(crate) theirs: Option<f64>,
}

/// What to draw.
#[derive(Debug)]
pub(crate) struct Series<'a> {
    pub(crate) ours: &'static str,
    pub(crate) theirs: Option<&'static str>,
    pub(crate) backend: &'static str,
    pub(crate) server_version: Option<String>,
    pub(crate) ops: u64,
    pub(crate) points: &'a [Point],
}

const OURS: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const THEIRS: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// Check, before a sweep, that the chart can be written to `path`: its directory must
/// exist (no directory is created: one the user did not ask for, `/nonexistent` as root,
/// would be left behind by a sweep that then fails), and the file is opened for writing (a
/// file that was not there is removed again).
pub(crate) fn check_writable(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        match std::fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory",
                    dir.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "the directory {} does not exist (baton does not create it)",
                        dir.display()
                    ),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if !existed {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Draw the chart to `path`, whose directory must exist ([`check_writable`]). The x axis
/// is log2(workers).
pub(crate) fn draw(path: &Path, s: &Series<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let x = |w: u64| (w.max(1) as f64).log2();
    let x_max = s.points.iter().map(|p| x(p.workers)).fold(1.0, f64::max);
    let y_max = s
        .points
        .iter()
        .flat_map(|p| std::iter::once(p.ours).chain(p.theirs))
        .fold(1.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let backend = match &s.server_version {
        Some(v) => format!("{} {v}", s.backend),
        None => s.backend.to_string(),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "baton bench contended: lock+unlock/s on one key ({backend}, {} ops per point)",
                s.ops
            ),
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.2f64..x_max + 0.2, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_labels(s.points.len().max(2))
        .x_label_formatter(&|v| format!("{}", 2f64.powf(*v).round()))
        .x_desc("workers (each with its own connection and session)")
        .y_desc("lock+unlock per second")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;

    let ours: Vec<(f64, f64)> = s.points.iter().map(|p| (x(p.workers), p.ours)).collect();
    chart
        .draw_series(LineSeries::new(ours.clone(), OURS.stroke_width(3)))?
        .label(s.ours)
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], OURS.stroke_width(3)));
    chart.draw_series(ours.iter().map(|&p| Circle::new(p, 4, OURS.filled())))?;

    if let Some(name) = s.theirs {
        let theirs: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter_map(|p| p.theirs.map(|t| (x(p.workers), t)))
            .collect();
        chart
            .draw_series(LineSeries::new(theirs.clone(), THEIRS.stroke_width(3)))?
            .label(name)
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], THEIRS.stroke_width(3)));
        chart.draw_series(theirs.iter().map(|&p| Circle::new(p, 4, THEIRS.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        let points = [
            Point {
                workers: 1,
                ours: 900.0,
                theirs: Some(850.0),
            },
            Point {
                workers: 8,
                ours: 600.0,
                theirs: Some(80.0),
            },
        ];
        draw(
            &path,
            &Series {
                ours: "baton",
                theirs: Some("etcd-lock-api"),
                backend: "etcd",
                server_version: Some("3.4.23".into()),
                ops: 10,
                points: &points,
            },
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("etcd-lock-api"));
    }
}
