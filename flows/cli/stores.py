"""The commands that read a study's store: `status`, `figure`, `clusters`, `report`, `aggregate`."""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from .options import _int_list


CLUSTER_EXAMPLES = """\
examples:
  saliency-atlas clusters runs/shapes.zarr --method gradcam
  saliency-atlas clusters runs/shapes.zarr --method gradcam --class square --json
  saliency-atlas clusters runs/audit.zarr --method gradcam --clusters 2 --recompute

Each cluster is listed with its size, the model's accuracy on it and the mean of every stored
metric over its maps; the figure shows its mean map and its most typical samples.
"""

def cmd_clusters(args: argparse.Namespace) -> None:
    from tasks import clusters

    only = args.classes.split(",") if args.classes else None
    record = clusters.ensure(args.store, args.method, args.recompute, only=only, size=args.size,
                             neighbours=args.neighbours, max_clusters=args.max_clusters, clusters=args.clusters,
                             seed=args.seed)
    found = clusters.cluster_table(args.store, args.method, only)
    if args.json:
        print(json.dumps(found))
        return
    print(f"{args.method}: {record['maps']} maps clustered per true class ({record['size']}x{record['size']} "
          f"downsampled, {record['neighbours']}-nearest-neighbour graph)")
    for name, rows in found.items():
        gap = rows[0]["eigengap"] if rows else None
        print(f"\n{name}: {len(rows)} cluster(s), eigengap {gap}")
        for c in rows:
            scores = "  ".join(f"{k} {v:.3f}" for k, v in c["scores"].items() if v is not None)
            print(f"  cluster {c['cluster']}: {c['size']:>5} maps  accuracy {c['accuracy']}  {scores}")
            print(f"    e.g. {', '.join(c['sample_ids'][:4])}")
    figure = args.figure or f"{os.path.splitext(args.store.rstrip('/'))[0]}.clusters.{args.method}.png"
    if figure.lower() != "none":
        print(f"\nfigure:  {clusters.render_clusters(args.store, args.method, figure, only)}")

def cmd_report(args: argparse.Namespace) -> None:
    from tasks import report
    from tasks.audit.rows import default_report_dir

    out = args.out or default_report_dir(args.store)
    print(f"report:  {report.write(args.store, out, max_samples=args.max_samples, shared_scale=args.shared_scale, protocols=args.protocol)}")

def cmd_protocol_status(store: str) -> None:
    import storage

    st = storage.ResultStore(store, mode="r").status()
    who = st["identity"]
    print(f"store    {st['path']}  ({st['protocol']} protocol)")
    print(f"model    {who.get('model')}  (fingerprint {str(who.get('model_fingerprint'))[:12]})")
    print(f"dataset  {who.get('dataset')}  (fingerprint {str(who.get('dataset_fingerprint'))[:12]})")
    for part, (done, total) in st["parts"].items():
        print(f"  {part.ljust(12)} {done:>5}/{total} units done  [{('#' * round(20 * done / max(total, 1))).ljust(20)}]")

def _damaged_line(d: dict[str, Any]) -> str:
    if d["kind"] == "protocol":
        return f"damaged  {d['part']} unit {tuple(d['unit'])}: {d['why']}"
    what = {"samples": "inputs", "maps": f"{d['xai_method']} maps",
            "scores": f"{d['xai_method']} scores of {d.get('metric')}"}[d["kind"]]
    return f"damaged  block {d['block']} {what}: {d['why']}"


def cmd_verify(store: str) -> int:
    """Read every finished block (or protocol unit) back against its checksum; unset the damaged ones' flags."""
    import storage

    protocol = storage.is_result_store(store)
    s = storage.ResultStore(store) if protocol else storage.Store(store)
    st = s.status()
    finished = (sum(done for done, _ in st["parts"].values()) if protocol else
                st["ingested"] + sum(st["methods"].values()) + sum(sum(m.values()) for m in st["scored"].values()))
    kind = "units" if protocol else "blocks"
    damaged = s.verify()
    for d in damaged:
        print(_damaged_line(d))
    if not damaged:
        print(f"verified {finished} finished {kind}: every one matches its checksum")
        return 0
    s.mark_damaged(damaged)
    again = f"the {st['protocol']} command" if protocol else "the study (the same command)"
    print(f"verify   {len(damaged)} of {finished} finished {kind} damaged and marked not done; rerun {again} "
          "to recompute exactly them")
    return 1


def cmd_status(store: str, verify: bool = False) -> int | None:
    import storage

    if storage.is_result_store(store):
        cmd_protocol_status(store)
        return cmd_verify(store) if verify else None
    st = storage.Store(store, mode="r").status(masks=verify)  # --verify reads everything anyway
    print(f"store    {st['path']}")
    print(f"model    {st['model']}  (fingerprint {str(st['model_fingerprint'])[:12]})")
    print(f"dataset  {st['dataset']}  (fingerprint {str(st['dataset_fingerprint'])[:12]})")
    print(f"samples  {st['samples']} in {st['blocks']} blocks; inputs ingested: {st['ingested']}/{st['blocks']}")
    a = storage.Store(store, mode="r").attrs
    print(f"input    {'x'.join(map(str, a['image_shape'][1:]))}, mean {a.get('image_mean')}, std {a.get('image_std')}"
          + (f" (model card {a['model_card']})" if a.get("model_card") else ""))
    from tasks.study.accuracy import accuracy_warning

    if (warning := accuracy_warning(store)) is not None:
        print(f"warning  {warning}")
    for c in storage.holders(store):
        print(f"claimed  {c['unit']} by pid {c.get('pid')} on {c.get('host')} for {time.time() - c.get('since', 0):.0f} s "
              "(a run is computing it; the claim ends with that process)")
    if st.get("empty_masks"):
        print(f"masks    {st['empty_masks']} of the ingested samples have an empty mask (the localisation metrics leave "
              "them out); check the dataset's masks or boxes")
    per_map = st["bytes_per_map"]
    grid = f" at {st['map_grid'][0]}x{st['map_grid'][1]} (read back upsampled)" if st.get("map_grid") else ""
    print(f"maps     {st['map_dtype']}{grid}, {st['compression']}; "
          + (f"{per_map / 1024:.1f} KiB stored per map" if per_map else "no map stored yet"))
    print("stored   " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in st["bytes_stored"].items()))
    width = max(len(m) for m in st["methods"])
    for m, done in st["methods"].items():
        bar = "#" * round(20 * done / st["blocks"])
        params = ", ".join(f"{k}={v}" for k, v in st["params"].get(m, {}).items())
        print(f"  {m.ljust(width)}  {done:>5}/{st['blocks']}  [{bar.ljust(20)}]  {params}")
    codes = json.loads(st.get("failure_codes") or "{}")
    for m, counts in st["failures"].items():
        print(f"  {m}: {sum(counts.values())} failed map(s), stored as NaN and left out of every score: "
              + "; ".join(f"{n} {codes.get(str(c), f'code {c}')}" for c, n in counts.items()))
    for metric, per_method in st["scored"].items():
        print(f"scored by {metric}: " + ", ".join(f"{m} {n}/{st['blocks']}" for m, n in per_method.items()))
    from tasks.study.estimate import describe_estimate, stored_estimate

    print("\n".join(describe_estimate(stored_estimate(store), per_map)))
    return cmd_verify(store) if verify else None

def cmd_aggregate(args: argparse.Namespace) -> None:
    import storage

    storage.Store(args.store, mode="r")  # no store, an unfinished one, a protocol's: one line that says which
    out = args.out or storage.default_out(args.store)
    agg = storage.aggregate(args.store, out, by=args.by)
    print(f"aggregate: {out}  ({int(agg.map_count_all.sum())} maps of {agg.attrs['samples']} samples x "
          f"{agg.sizes['xai_method']} methods counted; open with xr.open_zarr)")
    if args.plot:
        from tasks.drawing.aggregate import plot_means

        for path in plot_means(agg, args.plot):
            print(f"plot:      {path}")


def cmd_figure(args: argparse.Namespace) -> None:
    from tasks import render

    methods = args.methods.split(",") if args.methods else None
    print(render(args.store, args.out, args.samples, methods, shared_scale=args.shared_scale))


def store_command(sub: Any, name: str, func: Any, help: str, **kwargs: Any) -> argparse.ArgumentParser:
    """The parser of a command on one study store: its `store` argument, and `func` to run it."""
    p = sub.add_parser(name, help=help, **kwargs)
    p.add_argument("store", help="the study store: a path or an fsspec URL")
    p.set_defaults(func=func)
    return p


def add_parsers(sub: Any) -> None:
    st = store_command(sub, "status", lambda args: cmd_status(args.store, args.verify),
                       "blocks done per method (units per part of a protocol store), and the store's identity",
                       description="Blocks done per method, failed maps, scores, the store's identity, and the "
                                   "study's plan (model passes, bytes); of a protocol store (sanity, invariance, "
                                   "manipulate, roar), its units done per part. It reads flags and attributes only, "
                                   "so it answers in seconds at any size. "
                                   "--verify reads every finished block (inputs, maps, scores) or protocol unit back "
                                   "and checks it against the checksum recorded with its flag; a damaged one (a chunk "
                                   "file truncated, deleted or overwritten) is named and marked not done, so that "
                                   "rerunning the same command recomputes exactly those. Exit status 1 when any was "
                                   "found; it also counts the samples whose mask is empty.")
    st.add_argument("--verify", action="store_true",
                    help="check every finished block or protocol unit against its checksum, and count empty masks")

    f = store_command(sub, "figure", cmd_figure, "draw inputs and heatmaps of chosen samples")
    f.add_argument("--samples", type=_int_list, default=[0, 1, 2, 3], help="comma-separated sample positions")
    f.add_argument("--methods", default=None, help="comma-separated subset of the store's methods (default: all)")
    f.add_argument("--out", default="figure.png", help="output file (.png, .pdf, .svg)")
    f.add_argument("--shared-scale", action="store_true",
                   help="one colour scale per method's column (compare magnitudes down it); default: each map its own")

    add_clusters_parser(sub)

    r = store_command(sub, "report", cmd_report, "one self-contained HTML page to browse a study (no server, no network)",
                       description="Writes DIR/index.html with everything inline: per method a grid of samples "
                       "with their maps, filtered by class, correct or incorrect prediction and a metric's range; "
                       "the metrics table with bootstrap intervals, the baseline maps beside the methods; the "
                       "deletion/insertion curves; the clusters stored by `clusters`; the figures of protocol "
                       "stores given with --protocol. Open it in any browser.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--out", default=None, help="output folder (default: the store path with .report)")
    r.add_argument("--max-samples", type=int, default=200,
                   help="samples shown in the grid (spread evenly over the study; the tables use all)")
    r.add_argument("--shared-scale", action="store_true", help="one colour scale per method over the grid")
    r.add_argument("--protocol", action="append", default=[], metavar="STORE",
                   help="a sanity / invariance / manipulate / roar store whose figure the report includes (repeatable)")

    ag = store_command(sub, "aggregate", cmd_aggregate,
                       "mean/std maps per class and per correct/incorrect prediction (Dask, out of core)")
    ag.add_argument("--out", default=None, help="aggregate Zarr store (default: the study path with .agg.zarr)")
    ag.add_argument("--plot", default=None, metavar="PNG", help="also draw the mean maps (and correct vs incorrect) to this file")
    ag.add_argument("--by", choices=("label", "prediction"), default="label", help="group classes by the true label or the prediction")


def add_clusters_parser(sub: Any) -> None:
    c = store_command(sub, "clusters", cmd_clusters, "the strategies of a model: SpRAy clusters of one method's maps per class",
                       description="Spectral relevance analysis (Lapuschkin et al. 2019): per true class, the "
                       "method's maps are downsampled, compared by shape in a k-nearest-neighbour graph and "
                       "clustered in its spectral embedding; the eigengap says how many groups the class "
                       "splits into. A cluster apart from the rest is a strategy only some images get (a "
                       "watermark, a background). The clusters are stored in the study (`cluster`, "
                       "`eigengap`) and reused while the store and the parameters stay the same.",
                       epilog=CLUSTER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--method", required=True, help="one of the store's methods")
    c.add_argument("--class", dest="classes", default=None, help="comma-separated true classes to show (default: all)")
    c.add_argument("--clusters", type=int, default=None, help="a fixed number of clusters (default: the eigengap's choice)")
    c.add_argument("--max-clusters", type=int, default=8, help="the most clusters the eigengap may choose")
    c.add_argument("--neighbours", type=int, default=10, help="k of the k-nearest-neighbour affinity graph")
    c.add_argument("--size", type=int, default=16, help="maps are downsampled to SIZE x SIZE before comparing")
    c.add_argument("--seed", type=int, default=0, help="seed of k-means in the embedding")
    c.add_argument("--recompute", action="store_true", help="recompute even when matching clusters are stored")
    c.add_argument("--figure", default=None, help="each cluster's mean map and typical samples (default: "
                   "STORE.clusters.METHOD.png; 'none': no figure)")
    c.add_argument("--json", action="store_true",
                   help='print {class: [{"cluster", "size", "sample_ids", "accuracy", "scores", "eigengap"}...]} only')
