import json, sys, os
for name in sys.argv[1:]:
  f = os.path.join(os.environ.get('RUNS', '/tmp/issue13_runs'), name, 'metrics', 'pretrain_skills.jsonl')
  if not os.path.exists(f): print(name, "no skills yet"); continue
  for line in open(f):
    r = json.loads(line); step = r.get("step")
    levels = sorted({k.split("/")[0] for k in r if "/" in k})
    parts = []
    for lv in levels:
      g = lambda k: r.get(f"{lv}/{k}")
      s = f"{lv}: where {100*g('tf_where'):.0f} (p{100*g('prior_where'):.0f}) box {100*g('tf_box'):.0f}"
      if g("on_target") is not None: s += f" on_t {100*g('on_target'):.0f} iou50 {100*g('iou50'):.0f}"
      if g("cos_cross") is not None: s += f" | norm {g('img_norm'):.2f} cosX {g('cos_cross'):.3f} cosW {g('cos_within'):.3f} swapW {100*g('swap_where'):.0f}"
      parts.append(s)
    print(name, step, " || ".join(parts))
