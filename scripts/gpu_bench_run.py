#!/usr/bin/env python3
"""Runs the steps of `scripts/gpu-bench.sh` (use that script; this is its driver). Standard library only.

Each step is one command with its own timeout, run in its own process group; its output goes to the
combined log, a failure is recorded with its error text and the run goes on. A global time budget
skips the steps that no longer fit. nvidia-smi is sampled while every step runs (peak memory.used).
The result JSON is rewritten after every step, so a run cut short still leaves what it measured.
"""
import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SCRIPTS = os.path.join(ROOT, "scripts")

PROFILES = {
    # An H100/H200: Gemma 2 2B's real shape, the paper's crosscoder size.
    "gpu": dict(
        backend="wgpu", torch_device="cuda", preset="gemma2-2b",
        forward=[(1, 128), (8, 256)], decode=32, repeats=3,
        train=dict(d=2304, dict_size=73728, k=100, batch=2048, steps=5, kind="batchtopk"),
        cache=dict(layer=13, context=1024, batch_tokens=8192, tokens_default=65536, tokens_min=16384,
                   tokens_max=262144, target_seconds=25),
        analyze=dict(d=2304, dict_size=73728, k=100, tokens=16384),
        timeouts=dict(probe=90, train=150, torch_train=120, build=180, forward=120, torch_forward=180,
                      cache=200, torch_cache=150, analyze=150),
        # a step with less of the budget left than this is skipped rather than started and cut off
        min_seconds=dict(probe=15, train=30, torch_train=20, build=45, forward=40, torch_forward=30,
                         cache=60, torch_cache=30, analyze=40),
    ),
    # The dry run (CI, no GPU): the same steps at tiny sizes on the CPU.
    "dry": dict(
        backend="cpu", torch_device="cpu", preset="tiny",
        forward=[(1, 32), (2, 64)], decode=8, repeats=2,
        train=dict(d=64, dict_size=1024, k=8, batch=256, steps=5, kind="batchtopk"),
        cache=dict(layer=1, context=128, batch_tokens=1024, tokens_default=8192, tokens_min=8192,
                   tokens_max=8192, target_seconds=5),
        analyze=dict(d=64, dict_size=1024, k=8, tokens=4096),
        timeouts=dict(probe=60, train=60, torch_train=120, build=120, forward=60, torch_forward=120,
                      cache=90, torch_cache=120, analyze=60),
        min_seconds={},
    ),
}
MIN_STEP_SECONDS = 10  # default for min_seconds below
NV_ICD = "/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json"
NV_EGL = "/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json"


def utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def tail(text, lines=20, chars=3000):
    t = "\n".join(text.rstrip().splitlines()[-lines:])
    return t[-chars:]


def last_json(text):
    """The last stdout line that is a JSON object (crossdiff prints one before its summary line)."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict):
                return v
    return None


def nvidia_smi(query):
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return [[c.strip() for c in line.split(",")] for line in r.stdout.strip().splitlines() if line.strip()]


def gpu_mem_used_mib():
    rows = nvidia_smi("memory.used")
    try:
        return max(int(float(r[0])) for r in rows) if rows else None
    except ValueError:
        return None


class GpuSampler:
    """Polls `nvidia-smi --query-gpu=memory.used` in a background thread; keeps the maximum."""

    def __init__(self, period=0.25):
        self.max = None
        self.samples = 0
        self._stop = threading.Event()
        self._period = period
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            v = gpu_mem_used_mib()
            if v is not None:
                self.max = v if self.max is None else max(self.max, v)
                self.samples += 1
            self._stop.wait(self._period)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=20)
        return self.max


class Bench:
    def __init__(self, args):
        self.args = args
        self.mode = "dry-run" if args.dry_run else "gpu"
        self.p = PROFILES["dry" if args.dry_run else "gpu"]
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.work = args.work
        self.logf = open(args.log, "a", buffering=1, encoding="utf-8")
        self.nvsmi = shutil.which("nvidia-smi") is not None
        self.env = dict(os.environ)
        tmp = os.path.join(self.work, "tmp")
        os.makedirs(tmp, exist_ok=True)
        self.env.pop("CROSSDIFF_BACKEND", None)  # --backend is always given explicitly
        self.env["TMPDIR"] = tmp  # crossdiff's bench train/analyze write scratch files to temp_dir
        self.torch_ok = args.torch == "1"
        self.counters = {}
        self.steps = []
        self.bin = args.bin
        self.backend = self.p["backend"]
        self.r = {
            "schema": "crossdiff-gpu-bench/1",
            "mode": self.mode,
            "started_utc": utc(),
            "finished_utc": None,
            "total_seconds": None,
            "complete": False,
            "budget_seconds": args.budget,
            "units": {
                "*_tokens_per_s": "tokens per second (a token = one position of one sequence; cache and "
                                  "training count (base, chat) pairs as one token)",
                "*_seconds": "seconds (wall clock)", "seconds_per_step": "seconds per training step",
                "*_mib": "MiB (2^20 bytes)", "*_bytes": "bytes",
                "ratio_crossdiff_over_torch": "crossdiff value / PyTorch value (> 1: crossdiff faster, for rates)",
            },
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                     "platform": platform.platform()},
            "gpu": {},
            "crossdiff": {"binary": self.bin, "backend": self.backend},
            "torch": None,
            "setup": {"notes": [n for n in (args.setup_notes or "").split("\n") if n.strip()]},
            "profile": {k: v for k, v in self.p.items() if k not in ("timeouts", "min_seconds")},
            "timeouts_seconds": self.p["timeouts"],
            "models": None,
            "results": {},
            "steps": self.steps,
            "log_file": os.path.basename(args.log),
        }

    # -- output ------------------------------------------------------------------------------
    def say(self, msg):
        line = f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - self.t0:5.0f}s] gpu-bench: {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")

    def save(self):
        self.r["total_seconds"] = round(time.monotonic() - self.t0, 1)
        tmp = self.args.out + ".tmp"
        r = dict(self.r, steps=[{k: v for k, v in s.items() if not k.startswith("_")} for s in self.steps])
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(r, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.args.out)

    def left(self):
        return self.deadline - time.monotonic()

    # -- one step ----------------------------------------------------------------------------
    def run(self, name, argv, kind, sample_gpu=True):
        """Runs argv; returns the step record (rc, seconds, timed_out, error, json, output, GPU memory)."""
        cmd = shlex.join(str(a) for a in argv)
        rec = {"name": name, "cmd": cmd}
        timeout = self.p["timeouts"][kind]
        min_seconds = self.p["min_seconds"].get(kind, MIN_STEP_SECONDS)
        left = self.left()
        if left < min_seconds:
            rec.update(skipped=f"time budget: {left:.0f}s of {self.args.budget}s left")
            self.say(f"{name}: SKIPPED ({rec['skipped']})")
            self.steps.append(rec)
            self.save()
            return rec
        timeout = max(1.0, min(timeout, left))
        rec["timeout_seconds"] = round(timeout)
        self.say(f"{name}: start (timeout {timeout:.0f}s): {cmd}")
        self.logf.write(f"===== {name} ({utc()}): {cmd}\n")
        self.logf.flush()
        start_off = os.path.getsize(self.args.log)
        baseline = gpu_mem_used_mib() if (sample_gpu and self.nvsmi) else None
        sampler = GpuSampler() if (sample_gpu and self.nvsmi) else None
        t = time.monotonic()
        timed_out = False
        try:
            proc = subprocess.Popen([str(a) for a in argv], stdout=self.logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT, start_new_session=True)
        except OSError as e:
            rec.update(rc=None, seconds=0.0, timed_out=False, error=f"cannot start: {e}")
            if sampler:
                sampler.stop()
            self.say(f"{name}: FAILED to start: {e}")
            self.steps.append(rec)
            self.save()
            return rec
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.poll()
        secs = time.monotonic() - t
        peak = sampler.stop() if sampler else None
        self.logf.flush()
        with open(self.args.log, encoding="utf-8", errors="replace") as f:
            f.seek(start_off)
            out = f.read()
        self.logf.write(f"===== {name}: rc={rc} in {secs:.1f}s{' (TIMED OUT)' if timed_out else ''}\n")
        rec.update(rc=rc, seconds=round(secs, 2), timed_out=timed_out)
        if peak is not None:
            rec.update(gpu_mem_peak_mib=peak, gpu_mem_baseline_mib=baseline,
                       gpu_mem_peak_delta_mib=None if baseline is None else peak - baseline,
                       gpu_mem_samples=sampler.samples)
        js = last_json(out)
        if js is not None:
            rec["json"] = js
        lines = [l for l in out.splitlines() if l.strip()]
        if lines:
            rec["summary_line"] = lines[-1][:500]
        adapters = sorted({l.strip()[:300] for l in lines if re.search(r"adapter", l, re.I)})
        if adapters:
            rec["adapter_lines"] = adapters[:5]
        # Newer builds name the device in their summary line: "(..., wgpu: NVIDIA H100 80GB HBM3 (Vulkan))".
        for l in reversed(lines):
            m = re.search(r"wgpu: (.+?) \((\w+)(, a CPU adapter)?\)", l)
            if m:
                rec["wgpu_adapter"] = {"name": m.group(1).strip(), "api": m.group(2), "cpu_adapter": bool(m.group(3))}
                break
        counters = [l.strip() for l in lines if "readbacks/step=" in l]
        if counters:
            rec["counters_line"] = counters[-1][:300]
        if timed_out:
            rec["error"] = f"timed out after {secs:.0f}s; last output:\n{tail(out)}"
        elif rc != 0:
            rec["error"] = f"exit status {rc}; last output:\n{tail(out)}"
        state = "TIMED OUT" if timed_out else ("ok" if rc == 0 else f"FAILED (rc={rc})")
        mem = f", GPU memory peak {peak} MiB" if peak is not None else ""
        self.say(f"{name}: {state} in {secs:.1f}s{mem}"
                 + (f" :: {rec['summary_line'][:160]}" if "summary_line" in rec else ""))
        self.steps.append(rec)
        self.save()
        rec["_output"] = out  # for the caller; removed before the record is saved again
        return rec

    def clean(self, rec):
        rec.pop("_output", None)
        return rec

    def cd(self, *args):
        return [self.bin, "--backend", self.backend, *[str(a) for a in args]]

    def py(self, script, *args):
        return [sys.executable if not self.args.python else self.args.python, os.path.join(SCRIPTS, script),
                *[str(a) for a in args]]

    # -- measurements ------------------------------------------------------------------------
    @staticmethod
    def ok(rec):
        return rec.get("rc") == 0 and not rec.get("timed_out") and "skipped" not in rec

    def side(self, rec, fields):
        """One side of a comparison: the chosen fields of the step's JSON, its memory and its step name."""
        out = {"step": rec["name"]}
        if "skipped" in rec:
            out["skipped"] = rec["skipped"]
            return out
        if not self.ok(rec):
            out["error"] = rec.get("error", "failed")
            return out
        js = rec.get("json") or {}
        for k in fields:
            if k in js:
                out[k] = js[k]
        for k in ("gpu_mem_peak_mib", "gpu_mem_peak_delta_mib"):
            if rec.get(k) is not None:
                out[k] = rec[k]
        return out

    @staticmethod
    def ratio(a, b, key):
        x, y = a.get(key), b.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and y:
            return round(x / y, 4)
        return None

    def info(self):
        g = {}
        rows = nvidia_smi("name,driver_version,memory.total")
        if rows:
            g.update(name=rows[0][0], driver=rows[0][1], memory_total_mib=int(float(rows[0][2])), count=len(rows))
        elif self.mode == "gpu":
            g["error"] = "nvidia-smi not found or failed"
        else:
            g["note"] = "dry run: no GPU (crossdiff on --backend cpu)"
        self.r["gpu"].update(g)
        try:
            v = subprocess.run([self.bin, "--version"], capture_output=True, text=True, timeout=30)
            self.r["crossdiff"]["version"] = (v.stdout or v.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            self.r["crossdiff"]["version"] = f"error: {e}"
        h = hashlib.sha256()
        with open(self.bin, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        self.r["crossdiff"]["sha256"] = h.hexdigest()
        self.r["crossdiff"]["bytes"] = os.path.getsize(self.bin)
        # Newer crossdiff builds can report readbacks/dispatches per step; use it where it exists.
        self.counters = {}
        for sub in ("train", "analyze"):
            try:
                hp = subprocess.run([self.bin, "bench", sub, "--help"], capture_output=True, text=True, timeout=30)
                self.counters[sub] = "--counters" in hp.stdout
            except (OSError, subprocess.TimeoutExpired):
                self.counters[sub] = False
        self.r["crossdiff"]["counters_flag"] = self.counters
        if self.mode == "gpu":
            for k in ("VK_DRIVER_FILES", "VK_ICD_FILENAMES", "__EGL_VENDOR_LIBRARY_FILENAMES", "LD_LIBRARY_PATH"):
                if os.environ.get(k):
                    self.r["setup"].setdefault("env", {})[k] = os.environ[k]
            if shutil.which("vulkaninfo"):
                try:
                    vi = subprocess.run(["vulkaninfo", "--summary"], capture_output=True, text=True, timeout=30,
                                        env=self.env)
                    self.logf.write("===== vulkaninfo --summary\n" + vi.stdout + vi.stderr)
                    names = re.findall(r"deviceName\s*=\s*(.+)", vi.stdout)
                    self.r["setup"]["vulkaninfo_devices"] = [n.strip() for n in names]
                except (OSError, subprocess.TimeoutExpired):
                    pass
        self.save()

    def probe(self):
        """A tiny crossdiff job on the chosen backend; on a GPU machine, retries with the NVIDIA ICD."""
        tiny = ["bench", "train", "--d", "16", "--dict-size", "256", "--k", "4", "--batch", "64", "--steps", "2"]
        rec = self.clean(self.run("crossdiff-probe", self.cd(*tiny), "probe"))
        if self.ok(rec) or self.mode != "gpu":
            return self.ok(rec)
        attempts = []
        if os.path.exists(NV_ICD) and self.env.get("VK_DRIVER_FILES") != NV_ICD:
            fix = [("VK_DRIVER_FILES", NV_ICD)]
            if os.path.exists(NV_EGL):
                fix.append(("__EGL_VENDOR_LIBRARY_FILENAMES", NV_EGL))
            attempts.append(fix)
        libs = [d for d in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib") if os.path.isdir(d)]
        if libs:
            current = self.env.get("LD_LIBRARY_PATH", "")
            attempts.append([("LD_LIBRARY_PATH", ":".join(libs + ([current] if current else [])))])
        for i, extra in enumerate(attempts):  # cumulative: each retry keeps the previous settings
            self.env.update(dict(extra))
            note = "probe failed; retrying with " + ", ".join(f"{k}={v}" for k, v in extra)
            self.say(note)
            self.r["setup"]["notes"].append(note)
            self.r["setup"].setdefault("env", {}).update(dict(extra))
            rec = self.clean(self.run(f"crossdiff-probe-retry{i + 1}", self.cd(*tiny), "probe"))
            if self.ok(rec):
                for s in self.steps:  # the failed tries were fixed by this one
                    if s["name"].startswith("crossdiff-probe") and not self.ok(s):
                        s["superseded"] = f"fixed by {rec['name']}"
                self.save()
                return True
        return False

    def train(self):
        t = self.p["train"]
        a = ["--d", t["d"], "--dict-size", t["dict_size"], "--k", t["k"], "--batch", t["batch"],
             "--kind", t["kind"], "--steps", t["steps"]]
        extra = ["--counters"] if self.counters.get("train") else []
        cd = self.clean(self.run("crossdiff-train", self.cd("bench", "train", *a, *extra), "train"))
        fields = ["seconds_per_step", "tokens_per_s", "peak_host_bytes", "steps"]
        res = {"sizes": t, "crossdiff": self.side(cd, fields)}
        if "counters_line" in cd:
            res["crossdiff"]["counters"] = cd["counters_line"]
        if self.torch_ok:
            th = self.clean(self.run("torch-train", self.py("bench_train_torch.py", *a, "--device",
                                                              self.p["torch_device"]),
                                     "torch_train"))
            res["torch"] = self.side(th, fields + ["impl", "device_name", "peak_device_bytes", "allow_tf32",
                                                   "threads"])
            res["torch"]["implementation"] = "scripts/bench_train_torch.py: dense f32 step (the full B×D decode)"
            res["ratio_crossdiff_over_torch"] = {
                "tokens_per_s": self.ratio(res["crossdiff"], res["torch"], "tokens_per_s"),
                "gpu_mem_peak_delta_mib": self.ratio(res["crossdiff"], res["torch"], "gpu_mem_peak_delta_mib"),
            }
        else:
            res["torch"] = {"skipped": "torch not installed"}
        self.r["results"]["train"] = res
        self.save()

    def models(self):
        """(base, chat) snapshot dirs: a random 2B-shaped pair built with transformers, or the demo pair."""
        if self.torch_ok:
            out = os.path.join(self.work, "models")
            rec = self.clean(self.run("build-models", self.py("gpu_bench_torch.py", "build", "--out", out, "--preset",
                                                               self.p["preset"], "--device", self.p["torch_device"]),
                                      "build"))
            info = {"source": f"random transformers init, preset {self.p['preset']}, bf16", "step": rec["name"]}
            if self.ok(rec):
                js = rec.get("json") or {}
                info.update(config=js.get("config"), build_seconds=js.get("seconds"),
                            models={k: {kk: v[kk] for kk in ("parameters", "bytes", "seed", "files") if kk in v}
                                    for k, v in (js.get("models") or {}).items()})
                self.r["models"] = info
                self.save()
                return os.path.join(out, "base"), os.path.join(out, "chat")
            info["error"] = rec.get("error")
            self.r["models"] = info
            self.save()
            if self.mode == "gpu":
                return None
            self.say("building the tiny pair failed; the dry run falls back to assets/demo")
        if self.mode == "gpu":  # the demo pair would time nothing worth having on a GPU
            self.r["models"] = {"skipped": "torch not installed: no Gemma 2 2B-shaped pair to benchmark"}
            self.save()
            return None
        base, chat = os.path.join(ROOT, "assets", "demo", "base"), os.path.join(ROOT, "assets", "demo", "chat")
        cfg = json.load(open(os.path.join(base, "config.json")))
        self.r["models"] = {"source": "assets/demo (the committed miniature base/chat pair)"
                                      + ("" if self.torch_ok else "; torch not installed"),
                            "base": os.path.relpath(base, ROOT), "chat": os.path.relpath(chat, ROOT), "config": cfg}
        self.save()
        return base, chat

    def forward(self, base):
        rows = []
        fields = ["prefill_tokens_per_s", "decode_tokens_per_s", "peak_host_bytes", "device_bytes"]
        for b, t in self.p["forward"]:
            cd = self.clean(self.run(f"crossdiff-forward-{b}x{t}", self.cd(
                "bench", "forward", "--model", base, "--batch", b, "--context", t, "--decode", self.p["decode"],
                "--repeats", self.p["repeats"]), "forward"))
            side = self.side(cd, fields)
            side["step_seconds"] = cd.get("seconds")
            rows.append({"batch": b, "context": t, "decode_tokens": self.p["decode"], "crossdiff": side})
        self.r["results"]["forward"] = rows
        self.save()
        if not self.torch_ok:
            for row in rows:
                row["torch"] = {"skipped": "torch not installed"}
            self.save()
            return
        shapes = ",".join(f"{b}x{t}" for b, t in self.p["forward"])
        th = self.clean(self.run("torch-forward", self.py(
            "gpu_bench_torch.py", "forward", "--model", base, "--shapes", shapes, "--decode", self.p["decode"],
            "--repeats", self.p["repeats"], "--device", self.p["torch_device"]), "torch_forward"))
        js = th.get("json") or {}
        by_shape = {(x.get("batch"), x.get("context")): x for x in js.get("results", [])}
        for row in rows:
            side = self.side(th, [])
            if self.ok(th):
                side.update({k: v for k, v in by_shape.get((row["batch"], row["context"]), {}).items()
                             if k not in ("batch", "context")})
                side.update(impl=js.get("impl"), dtype=js.get("dtype"), attn_implementation=js.get("attn_implementation"),
                            device_name=js.get("device_name"), load_seconds=js.get("load_seconds"))
                side["note"] = "gpu_mem_peak_* cover the whole torch-forward step (all shapes)"
            row["torch"] = side
            row["ratio_crossdiff_over_torch"] = {
                "prefill_tokens_per_s": self.ratio(row["crossdiff"], side, "prefill_tokens_per_s"),
                "decode_tokens_per_s": self.ratio(row["crossdiff"], side, "decode_tokens_per_s"),
            }
        self.save()

    def write_data(self, tokens, context):
        """Long documents (blank-line separated) built from the demo corpus, so rows fill the context."""
        src = open(os.path.join(ROOT, "assets", "demo", "data", "web.txt"), encoding="utf-8").read()
        paras = [" ".join(p.split()) for p in src.split("\n\n") if p.strip()]
        n_docs = math.ceil(tokens / context) * 5 // 4 + 8
        chars = context * 8  # the demo tokenizer makes well over one token per 8 characters
        docs, i = [], 0
        for d in range(n_docs):
            parts, size = [], 0
            i = (i + 7 * d + 1) % len(paras)  # rotate the start so documents differ
            while size < chars:
                parts.append(paras[i % len(paras)])
                size += len(parts[-1]) + 1
                i += 1
            docs.append(" ".join(parts))
        path = os.path.join(self.work, "data", "long-docs.txt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
        return path, len(docs)

    def cache(self, base, chat):
        c = self.p["cache"]
        layers = json.load(open(os.path.join(base, "config.json")))["num_hidden_layers"]
        layer = min(c["layer"], layers - 1)
        # Tokens: ~target_seconds of crossdiff caching, estimated from its 8x256 prefill rate (the
        # cache runs 2 x (L+1)/n_layers of the blocks but no unembedding: about one forward's cost).
        tokens = c["tokens_default"]
        how = "default"
        fwd = self.r["results"].get("forward") or []
        rate = next((r["crossdiff"].get("prefill_tokens_per_s") for r in reversed(fwd)
                     if r["crossdiff"].get("prefill_tokens_per_s")), None)
        if rate:
            tokens = int(rate * c["target_seconds"])
            how = f"~{c['target_seconds']}s at crossdiff's {fwd[-1]['batch']}x{fwd[-1]['context']} prefill rate"
        tokens = max(c["tokens_min"], min(c["tokens_max"], tokens))
        tokens = -(-tokens // c["context"]) * c["context"]
        shard = max(c["context"], -(-tokens // 8 // c["context"]) * c["context"])
        data, n_docs = self.write_data(tokens, c["context"])
        res = {"layer": layer, "tokens": tokens, "tokens_chosen": how, "context": c["context"],
               "batch_tokens": c["batch_tokens"], "shard_tokens": shard,
               "data": {"file": "long-docs.txt (generated from assets/demo/data/web.txt)", "documents": n_docs}}
        out = os.path.join(self.work, "cd-cache")
        cd = self.run("crossdiff-cache", self.cd(
            "cache", "--base", base, "--chat", chat, "--data", data, "--layer", layer, "--tokens", tokens,
            "--context", c["context"], "--batch-tokens", c["batch_tokens"], "--shard-tokens", shard,
            "--out", out), "cache")
        side = self.side(cd, [])
        text = cd.pop("_output", "")
        m = re.search(r"([\d.]+) tokens/s after loading", text)
        idx_path = os.path.join(out, "cache.json")
        index = json.load(open(idx_path)) if os.path.exists(idx_path) else None
        if index:
            side.update(tokens_cached=index.get("total_tokens"), documents=index.get("documents"),
                        shards=len(index.get("shards", [])), complete=index.get("complete"))
        if m and self.ok(cd):
            side["tokens_per_s"] = float(m.group(1))
            side["tokens_per_s_source"] = "crossdiff's summary line (after loading)"
        # Shard completion times: a rate that needs no summary line (also for a run cut short).
        if index and len(index.get("shards", [])) >= 2:
            shards = index["shards"]
            times = [os.path.getmtime(os.path.join(out, s["file"])) for s in shards]
            span = times[-1] - times[0]
            if span > 0:
                side["tokens_per_s_from_shards"] = round(sum(s["tokens"] for s in shards[1:]) / span, 2)
                if "tokens_per_s" not in side:
                    side["tokens_per_s"] = side["tokens_per_s_from_shards"]
                    side["tokens_per_s_source"] = "shard file times (shards 2..n)"
        res["crossdiff"] = side
        self.steps[-1] = self.clean(cd)
        shutil.rmtree(out, ignore_errors=True)
        if self.torch_ok:
            tout = os.path.join(self.work, "torch-cache")
            th = self.clean(self.run("torch-cache", self.py(
                "gpu_bench_torch.py", "cache", "--base", base, "--chat", chat, "--data", data, "--layer", layer,
                "--tokens", tokens, "--context", c["context"], "--batch-tokens", c["batch_tokens"],
                "--shard-tokens", shard, "--out", tout, "--device", self.p["torch_device"]),
                "torch_cache"))
            res["torch"] = self.side(th, ["tokens_per_s", "seconds", "tokens", "documents", "load_seconds",
                                          "peak_device_bytes", "peak_host_bytes", "route", "impl", "dtype",
                                          "device_name"])
            res["ratio_crossdiff_over_torch"] = {
                "tokens_per_s": self.ratio(res["crossdiff"], res["torch"], "tokens_per_s"),
                "gpu_mem_peak_delta_mib": self.ratio(res["crossdiff"], res["torch"], "gpu_mem_peak_delta_mib"),
            }
            shutil.rmtree(tout, ignore_errors=True)
        else:
            res["torch"] = {"skipped": "torch not installed"}
        self.r["results"]["cache"] = res
        self.save()

    def analyze(self):
        a = self.p["analyze"]
        extra = ["--counters"] if self.counters.get("analyze") else []
        cd = self.clean(self.run("crossdiff-analyze", self.cd(
            "bench", "analyze", "--d", a["d"], "--dict-size", a["dict_size"], "--k", a["k"], "--tokens", a["tokens"],
            *extra), "analyze"))
        side = self.side(cd, ["analyze_tokens_per_s", "tokens", "examples_seconds", "query_ms_median",
                              "query_ms_max", "chat_only", "shared"])
        if "counters_line" in cd:
            side["counters"] = cd["counters_line"]
        self.r["results"]["analyze"] = {"sizes": a, "crossdiff": side,
                                        "torch": {"skipped": "no PyTorch counterpart in this benchmark"}}
        self.save()

    def main(self):
        self.say(f"mode {self.mode}, crossdiff {self.bin} (--backend {self.backend}), torch "
                 f"{'available' if self.torch_ok else 'not installed'}, budget {self.args.budget}s, "
                 f"JSON {self.args.out}")
        self.info()
        if self.r["gpu"].get("name"):
            self.say(f"GPU: {self.r['gpu']['name']}, driver {self.r['gpu'].get('driver')}")
        if not self.probe():
            self.say(f"crossdiff cannot run on --backend {self.backend}; its steps will fail (see the log)")
            self.r["setup"]["notes"].append(f"probe on --backend {self.backend} failed")
        adapters = sorted({l for s in self.steps if self.ok(s) for l in s.get("adapter_lines", [])})
        if adapters:
            self.r["crossdiff"]["adapter_lines"] = adapters
        self.train()
        pair = self.models()
        if pair:
            self.forward(pair[0])
            self.cache(*pair)
        else:
            why = self.r["models"].get("skipped") or "no models (building them failed)"
            for k in ("forward", "cache"):
                self.r["results"][k] = {"skipped": why}
        self.analyze()
        self.finish()

    def finish(self):
        adapters = sorted({l for s in self.steps if self.ok(s) for l in s.get("adapter_lines", [])})
        if adapters:
            self.r["crossdiff"]["adapter_lines"] = adapters
        wgpu = next((s["wgpu_adapter"] for s in self.steps if self.ok(s) and "wgpu_adapter" in s), None)
        if wgpu:
            self.r["crossdiff"]["wgpu_adapter"] = wgpu
            self.r["gpu"]["wgpu_adapter"] = f"{wgpu['name']} ({wgpu['api']})"
            if wgpu["cpu_adapter"] and self.mode == "gpu":
                self.r["setup"]["notes"].append("WARNING: crossdiff's wgpu adapter is a CPU adapter, not the GPU")
        cd_steps = [s for s in self.steps if s["name"].startswith("crossdiff-") and "gpu_mem_peak_delta_mib" in s]
        if cd_steps:
            self.r["crossdiff"]["max_gpu_mem_peak_delta_mib"] = max(s["gpu_mem_peak_delta_mib"] or 0 for s in cd_steps)
            self.r["crossdiff"]["ran_on_gpu"] = self.r["crossdiff"]["max_gpu_mem_peak_delta_mib"] > 256
        for s in self.steps:
            js = s.get("json") or {}
            if s["name"].startswith(("torch-", "build-")) and self.ok(s) and js.get("impl"):
                self.r["torch"] = {k: js[k] for k in ("impl", "device", "device_name", "cuda", "threads") if k in js}
                break
        if self.r["torch"] is None and not self.torch_ok:
            self.r["torch"] = {"skipped": "torch not installed"}
        self.r["failed_steps"] = [s["name"] for s in self.steps
                                  if "skipped" not in s and "superseded" not in s and not self.ok(s)]
        self.r["skipped_steps"] = [s["name"] for s in self.steps if "skipped" in s]
        self.r["complete"] = (not self.r["failed_steps"] and not self.r["skipped_steps"]
                              and "skipped" not in (self.r.get("models") or {"skipped": "none"}))
        self.r["finished_utc"] = utc()
        self.save()
        self.say(f"done in {time.monotonic() - self.t0:.0f}s: {len(self.steps)} steps, failed: "
                 f"{', '.join(self.r['failed_steps']) or 'none'}; skipped: {', '.join(self.r['skipped_steps']) or 'none'}")
        self.say(f"results: {self.args.out}")


def main():
    ap = argparse.ArgumentParser(description="driver of scripts/gpu-bench.sh")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--torch", choices=["0", "1"], default="0")
    ap.add_argument("--python", default=None, help="the python3 that has torch (default: this one)")
    ap.add_argument("--budget", type=int, default=None, help="seconds for all steps (default 440 GPU, 240 dry)")
    ap.add_argument("--setup-notes", default="")
    args = ap.parse_args()
    if args.budget is None:
        args.budget = 240 if args.dry_run else 440
    b = Bench(args)
    try:
        b.main()
    except Exception as e:  # noqa: BLE001  (the JSON must still be written)
        import traceback
        b.r.setdefault("errors", []).append(f"driver: {e!r}\n{traceback.format_exc()[-2000:]}")
        b.say(f"driver error: {e!r}")
        b.finish()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
