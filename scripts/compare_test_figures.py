"""Count the per-slice test figures a candidate improves over the bundled model (the
replacement rule of results/*/RULE.md): DSC and NSD up, HD95 and MAE down, for each class
on both renderings (MedSeg-100 slices and COVID-SemiSeg crops): 24 figures.

    python scripts/compare_test_figures.py BASE_medseg.json BASE_crops.json CAND_medseg.json CAND_crops.json

The JSON files are `ssalesionseg evaluate --json` outputs.
"""
import json
import sys

HIGHER = {"dsc": True, "nsd_3mm": True, "hd95_mm": False, "mae": False}


def compare(base: dict, cand: dict, label: str):
    rows = []
    for cls, m in base["classes"].items():
        for k, higher in HIGHER.items():
            b, c = m[k], cand["classes"][cls][k]
            rows.append((f"{label} {cls} {k}", b, c, (c > b) if higher else (c < b)))
    return rows


def main(argv):
    if len(argv) != 4:
        raise SystemExit(__doc__)
    base_m, base_c, cand_m, cand_c = (json.load(open(p)) for p in argv)
    rows = compare(base_m, cand_m, "medseg") + compare(base_c, cand_c, "crops")
    for name, b, c, better in rows:
        print(f"{name:<32}{b:>10.4f}{c:>10.4f}  {'better' if better else 'not better'}")
    n = sum(r[3] for r in rows)
    inf_b, inf_c = base_m["classes"]["infection"]["dsc"], cand_m["classes"]["infection"]["dsc"]
    print(f"{n} of {len(rows)} figures better; MedSeg infection DSC {inf_b:.4f} -> {inf_c:.4f}")
    verdict = n > len(rows) / 2 and inf_c >= inf_b
    # the rules' first gate, a validation score above the bundle's, is not checked here
    print("passes the test gate (the candidate must also have passed the validation gate)" if verdict
          else "fails the test gate: does not replace the bundled model")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
