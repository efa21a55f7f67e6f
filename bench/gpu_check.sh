#!/usr/bin/env bash
# Every measurement that needs a GPU, in ONE run of under 10 minutes (the GPU figures in
# bench/RESULTS.md come from it). Steps, most important first, each with its own time limit
# taken from one overall budget (GPU_CHECK_SECONDS, default 550 s), so that a slow step leaves
# the later ones their minimum and the whole run stays under ~9.5 minutes:
#   0. setup: `pip install --no-index` the wheels in gpu_wheels/ (when that folder exists);
#      unpack the CIFAR-10 JPEG archive (gpu_data/cifar10-train-jpeg.tar.gz, else shared/data/
#      or ../shared/data/) to a scratch folder: train/<class>/*.jpg
#   1. speedrun: python3 bench/speedrun.py recipes/cifar10_speedrun.yaml --seeds 5 on the
#      unpacked images (a warm-up fit, then 5 timed seeds: time to accuracy on val)
#   1b. speedrun_muon: the same with recipes/cifar10_speedrun_muon.yaml (Muon on the filters)
#   2. resnet18: dltrain fit recipes/cifar10_resnet18.yaml on the same images (image_folder,
#      val_split 0.1: 45,000 train / 5,000 val, the report on val): val accuracy, wall time
#   3. bench: make bench's benchmark at BENCH_SCALE=full (dltrain against a hand-written loop,
#      the tutorial's loop, Lightning; the seed recipe at batch 4; the torch.compile rows)
#   4. tests: the CUDA tests (resident bf16/channels_last/fused defaults, no host sync per
#      step, metrics on the device), then the 1-GPU DDP check (torchrun --nproc-per-node 1
#      reaches the plain run's accuracy on the quickstart)
# Everything goes under OUTDIR: machine.txt, pip.txt, <step>.txt (each step's output and exit
# status), speedrun.json, speedrun_muon.json, resnet18/ (report.json, metrics.csv, events.jsonl), bench.json and
# summary.txt (the key figures, written last, whatever failed).
#
# Usage, from the repository root on a CUDA machine whose python3 has torch and torchvision
# (`make gpu-prep` first fills gpu_wheels/ and gpu_data/; carry both to the machine):
#   bash bench/gpu_check.sh [OUTDIR]        (default bench/results/gpu)
# Knobs (environment), mostly for trying the script at tiny scale on a CPU:
#   GPU_CHECK_SECONDS  the overall budget (550)      GPU_CHECK_STEPS  subset of
#   SPEEDRUN_RECIPE    (recipes/cifar10_speedrun.yaml)  speedrun,speedrun_muon,resnet18,
#   SPEEDRUN_SEEDS     (5)                              bench,tests,ddp
#   SPEEDRUN_ARGS / MUON_ARGS / RESNET_ARGS  more overrides for those steps
#   BENCH_SCALE        (full)                        CIFAR_JPEG  the archive to unpack
set -uo pipefail
out=${1:-bench/results/gpu}
mkdir -p "$out" && out=$(cd "$out" && pwd)
repo=$(pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
began=$SECONDS
budget=${GPU_CHECK_SECONDS:-550}
steps=",${GPU_CHECK_STEPS:-speedrun,speedrun_muon,resnet18,bench,tests,ddp},"
scratch=$(mktemp -d "${TMPDIR:-/tmp}/dltrain-gpu-check.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
export DLTRAIN_CACHE="$scratch/cache"  # decoded images: the speedrun decodes, resnet18 reuses
# this run's files only: a step that does not run leaves no figures of an earlier run behind
rm -rf "$out/resnet18" "$out"/{speedrun,speedrun_muon,bench}.json \
    "$out"/{machine,pip,steps,speedrun,speedrun_muon,resnet18,bench,tests,ddp,summary}.txt
: > "$out/steps.txt"

# The minimum each step needs to be worth starting, in order: a step's limit leaves the
# minimums of the steps after it (see `limit`).
declare -A floor=([speedrun]=90 [speedrun_muon]=60 [resnet18]=80 [bench]=90 [tests]=40 [ddp]=35)
order=(speedrun speedrun_muon resnet18 bench tests ddp)

wanted() { [[ $steps == *",$1,"* ]]; }

# The time limit for step $1: at most $2 seconds, and leave the floors of the wanted steps
# after it; 0 when less than its own floor is left.
limit() {
    local name=$1 cap=$2 reserve=0 after=0 s
    for s in "${order[@]}"; do
        if ((after)) && wanted "$s"; then reserve=$((reserve + floor[$s])); fi
        [[ $s == "$name" ]] && after=1
    done
    local left=$((budget - (SECONDS - began) - reserve - 5))  # 5: timeout's kill grace
    ((left < cap)) && cap=$left
    ((cap < floor[$name])) && cap=0
    echo "$cap"
}

# run_step NAME CAP LOG COMMAND...: the command under its limit, output to LOG, one line in
# steps.txt. A step that times out gets SIGTERM (dltrain saves and stops), SIGKILL 5 s later.
run_step() {
    local name=$1 cap=$2 log=$3 seconds started rc
    shift 3
    wanted "$name" || return 0
    seconds=$(limit "$name" "$cap")
    if ((seconds == 0)); then
        echo "$name: skipped, $((budget - (SECONDS - began))) s of the budget left" \
            | tee -a "$out/steps.txt"
        return 0
    fi
    started=$SECONDS
    echo "== $name (limit ${seconds} s; $((SECONDS - began)) s into the run)"
    timeout --kill-after=5 "$seconds" "$@" > "$log" 2>&1
    rc=$?
    local what="exit $rc"
    ((rc == 124 || rc == 137)) && what="exit $rc: TIMED OUT"
    echo "$name: $what after $((SECONDS - started)) s (limit $seconds s)" \
        | tee -a "$out/steps.txt" >> "$log"
    tail -n 1 "$log"
}

# -- 0. setup -------------------------------------------------------------------------------
if [[ -d gpu_wheels ]]; then
    # what dltrain needs beyond the image's packages (pydantic, filelock), then pytest for the
    # tests step; by name, so pip picks the wheels of this python from those of several
    echo "== installing from gpu_wheels/"
    install() {
        local pip=(python3 -m pip install --quiet --disable-pip-version-check --no-index
            --find-links gpu_wheels "$@")
        timeout 120 "${pip[@]}" || timeout 120 "${pip[@]}" --break-system-packages
    }
    { install "pydantic>=2.5" "filelock>=3.12"; echo "dltrain's: exit $?"
      install pytest; echo "pytest: exit $?"; } > "$out/pip.txt" 2>&1
    echo "pip: $(tr '\n' ' ' < <(grep exit "$out/pip.txt")) ($((SECONDS - began)) s)" \
        | tee -a "$out/steps.txt"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, torchvision; print('python', __import__('sys').version.split()[0],
        '· torch', torch.__version__, '· torchvision', torchvision.__version__, '·',
        torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
    python3 -c "import lightning; print('lightning', lightning.__version__)" 2>/dev/null \
        || echo "lightning: not importable"
    python3 -c "import dltrain.cli; print('dltrain imports')"
    echo "cpus $(nproc)"
    free -g | sed -n 2p
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

archive=${CIFAR_JPEG:-}
for candidate in gpu_data/cifar10-train-jpeg.tar.gz shared/data/cifar10-train-jpeg.tar.gz \
    ../shared/data/cifar10-train-jpeg.tar.gz; do
    [[ -z $archive && -f $candidate ]] && archive=$candidate
done
data="$scratch/cifar10"
if [[ -n $archive ]] && mkdir -p "$data" && timeout 120 tar -xzf "$archive" -C "$data"; then
    echo "data: $archive unpacked to $data: $(find "$data/train" -name '*.jpg' | wc -l) images" \
        | tee -a "$out/steps.txt"
else
    echo "data: no CIFAR-10 JPEG archive unpacked (${archive:-none found}); the speedrun and" \
        "resnet18 steps will fail" | tee -a "$out/steps.txt"
fi

# -- 1. the CIFAR-10 speedrun: time to accuracy ---------------------------------------------
# shellcheck disable=SC2086  # the *_ARGS knobs are word lists
run_step speedrun 240 "$out/speedrun.txt" \
    python3 bench/speedrun.py "${SPEEDRUN_RECIPE:-recipes/cifar10_speedrun.yaml}" \
    --seeds "${SPEEDRUN_SEEDS:-5}" --json "$out/speedrun.json" "data.path=$data" \
    ${SPEEDRUN_ARGS:-}

# -- 1b. the speedrun with Muon ----------------------------------------------------------------
# shellcheck disable=SC2086
run_step speedrun_muon 150 "$out/speedrun_muon.txt" \
    python3 bench/speedrun.py recipes/cifar10_speedrun_muon.yaml \
    --seeds "${SPEEDRUN_SEEDS:-5}" --json "$out/speedrun_muon.json" "data.path=$data" \
    ${MUON_ARGS:-}

# -- 2. ResNet-18 on the real images ---------------------------------------------------------
# data.name=image_folder drops the torchvision dataset's keys (root) that image_folder does not
# take; a folder holding train/ only gives a train split, val_split carves val from it.
resnet_started=$SECONDS
# shellcheck disable=SC2086
run_step resnet18 150 "$out/resnet18.txt" \
    python3 -m dltrain fit recipes/cifar10_resnet18.yaml data.name=image_folder \
    "data.path=$data" "output=$scratch/runs" name=cifar10_resnet18_jpeg ${RESNET_ARGS:-}
resnet_seconds=$((SECONDS - resnet_started))
if wanted resnet18; then
    mkdir -p "$out/resnet18"
    for f in report.json metrics.csv events.jsonl recipe.yaml; do
        cp "$scratch/runs/cifar10_resnet18_jpeg/$f" "$out/resnet18/" 2>/dev/null
    done
    echo "$resnet_seconds" > "$out/resnet18/wall_seconds.txt"
fi

# -- 3. make bench at full scale -------------------------------------------------------------
run_step bench 210 "$out/bench.txt" \
    env BENCH_SCALE="${BENCH_SCALE:-full}" BENCH_JSON="$out/bench.json" python3 bench/run.py

# -- 4. the CUDA tests and the 1-GPU DDP check -----------------------------------------------
run_step tests 90 "$out/tests.txt" \
    python3 -m pytest -q -rs -p no:cacheprovider -k "not ddp" \
    tests/training/test_gpu.py tests/training/test_no_sync.py tests/reporting/test_metrics.py \
    tests/reporting/test_ranking_metrics.py
run_step ddp 60 "$out/ddp.txt" \
    python3 -m pytest -q -s -p no:cacheprovider tests/training/test_gpu.py -k ddp

# -- summary ---------------------------------------------------------------------------------
python3 - "$out" "$((SECONDS - began))" > "$out/summary.txt" 2>&1 <<'EOF'
import csv, json, re, sys
from pathlib import Path

out, total = Path(sys.argv[1]), sys.argv[2]


def section(title, write):
    print(f"## {title}")
    try:
        write()
    except Exception as exc:  # a step that failed or never ran: say so, go on
        print(f"  no figures ({type(exc).__name__}: {exc})")
    print()


def machine():
    print("  " + (out / "machine.txt").read_text().strip().replace("\n", "\n  "))


def speedrun(name="speedrun.json"):
    d = json.loads((out / name).read_text())
    print(f"  recipe {d['recipe']} · timed: {d['timed']}")
    w = d.get("warmup")
    if w:
        print(f"  warm-up/compile (seed {w['seed']}): {w['seconds']:.2f} s timed, "
              f"{w['fit_wall_seconds']:.1f} s whole fit, accuracy {w['accuracy']:.4f}")
    for r in d["runs"]:
        print(f"  seed {r['seed']}: {r['split']} accuracy {r['accuracy']:.4f} in "
              f"{r['seconds']:.2f} s (epochs {r['epochs']}; final eval "
              f"{r['final_eval_seconds']:.2f} s)")
    s = d["summary"]
    if s["seeds"]:
        a, t = s["accuracy"], s["seconds"]
        print(f"  {s['seeds']} seeds: accuracy {a['mean']:.4f} ± {a['std']:.4f}, time "
              f"{t['mean']:.2f} ± {t['std']:.2f} s, {s['reached_target']}/{s['seeds']} "
              f"reached {s['target']}")


def resnet18():
    folder = out / "resnet18"
    wall = (folder / "wall_seconds.txt").read_text().strip()
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    epochs = sum(float(r["seconds"]) for r in rows)
    last = rows[-1]
    print(f"  epochs: {len(rows)} in {wall} s wall (the command; epochs' own seconds "
          f"{epochs:.1f}); last epoch val_accuracy {last['val_accuracy']}")
    report = json.loads((folder / "report.json").read_text())
    print(f"  report: {report['split']} accuracy {report['accuracy']:.4f} "
          f"({report['num_samples']} samples, epoch {report.get('epoch')})")


def bench():
    d = json.loads((out / "bench.json").read_text())
    print(f"  {d['device']} · torch {d['torch']} · scale {d['scale']}")
    for case, f in d["cases"].items():
        base = f["handwritten"]
        cells = ", ".join(
            f"{k} {v:,.0f} ({v / base:.2f}x)" for k, v in f.items() if v is not None
        )
        print(f"  {case} (batch {d['batch_size'][case]}): {cells}; "
              f"paired {d['paired_ratio'][case]:.3f}")
    r = d.get("seed_recipe_b4")
    if r:
        print(f"  seed recipe at batch {r['batch_size']}: dltrain {r['dltrain']:,.0f} vs tutorial "
              f"{r['tutorial']:,.0f} samples/s = {r['ratio']:.2f}x (paired {r['paired_ratio']:.2f})")
    for mode, r in (d.get("compiled") or {}).items():
        if r is None:
            print(f"  compile={mode}: not measured ({d.get('compiled_skipped') or 'failed'})")
            continue
        first = r["first_epoch_seconds"]
        print(f"  compile={mode}: dltrain {r['dltrain']:,.0f} vs handwritten compiled "
              f"{r['handwritten']:,.0f} samples/s = {r['ratio']:.2f}x (paired "
              f"{r['paired_ratio']:.2f}); first epochs {first['dltrain'][0]:.1f} / "
              f"{first['handwritten'][0]:.1f} s")
    for error in d.get("errors") or []:
        print(f"  error: {error}")


def tests():
    for name in ("tests.txt", "ddp.txt"):
        lines = [l for l in (out / name).read_text().splitlines() if l.strip()]
        result = [l for l in lines if re.search(r"\d+ (passed|failed|skipped|errors?)\b", l)]
        print(f"  {name}: {(result or lines)[-1]}")
        quickstart = [l for l in lines if l.startswith("quickstart on")]
        if quickstart:
            print(f"  {quickstart[-1]}")


print(f"# bash bench/gpu_check.sh: {total} s in all\n")
section("machine", machine)
print("## steps")
print("  " + (out / "steps.txt").read_text().strip().replace("\n", "\n  ") + "\n")
section("speedrun (bench/speedrun.py)", speedrun)
section("speedrun with Muon", lambda: speedrun("speedrun_muon.json"))
section("ResNet-18 on the CIFAR-10 JPEGs (image_folder, 45,000/5,000)", resnet18)
section("bench (bench/run.py)", bench)
section("CUDA tests and 1-GPU DDP", tests)
EOF
cat "$out/summary.txt"
echo "everything is under $out ($((SECONDS - began)) s)"
