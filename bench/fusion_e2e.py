"""Fusion of real models, end to end (issue 16): a multi-LLM log from the offline zoo, then every
fusion level on it against the best single model, as one resumable command.

Stages (each writes `OUT/<stage>/stage.json` when done; a re-run skips finished stages and `collect`
also resumes inside a stage, call by call):
  questions  seeded per-task samples of the shared LLMRouter questions (+ RouteLLM's GSM8K): train, val
             (`--val-per-task`, from the train pool; 0: carved from train by the loader), test
  probe      `--probe N` train questions per task through every model; keep the tasks some model
             scores above zero on (at least --min-tasks); those calls are reused by collect
  collect    every kept question through every zoo model, plain and `_think` (fusion_lightning collect)
  judge      `--judge MODEL` grades a seeded sample of `--judge-sample` train calls with the FusionFactory
             rubric: its parse rate, and how often a parsed grade agrees with the task score (right vs wrong)
  query      router recipe(s) fitted on the log (`--routers`)
  library    a template library from the log's train split (rule summariser, or `--summariser MODEL`)
  retriever  the template_retriever recipe on that library
  thought    per zoo model: val selects its thought mode (`thought_auto`'s step: zero-shot and templates,
             exemplars, both at each k of `--thought-ks`, kept only past router_auto's paired test, with
             per-task exceptions; written to the library's thought_selection.json), then the test questions zero-shot, few-shot (k random
             exemplars of the library's pool, task and token budget: exemplars without the retrieval),
             templates, exemplars, both (trained retriever), the selected mode, and
             templates with the frozen encoder (unless --no-frozen), via `evaluate`'s live columns
  model      distill_top_k into `--student` (LoRA and/or full), exported, answering the held-out questions
  table      the paper's table (`evaluate`: singles, best single, routers, thought, students, oracle,
             95 % paired bootstrap CIs) + gains.md: each thought column − zero-shot and − best single,
             exemplars − random few-shot, trained − frozen retriever, student − base, each paired with its
             CI, and the mode val selected per model

    python bench/fusion_e2e.py                     # the zoo run (not yet made; see README)
    python bench/fusion_e2e.py --quick             # tiny random model + a reference answerer, seconds
    python bench/fusion_e2e.py --until collect     # stop after a stage; --redo thought redoes it and later ones

`--quick`: the package's tiny random Llama (`tiny-llama`) stands in for the zoo, plus a `reference`
pseudo-model that answers with the gold answer (so templates and distillation have solved questions);
a handful of questions of two tasks, hashing encoder, one epoch per fit. It checks the pipeline, not fusion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _e2e  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FUSION_LIGHTNING_SHARED_DATA", ROOT.parent / "shared" / "data"))
FOLDS = 2  # cross-fitted thought selection: retrievers, each fitted without one fold of the train questions
STAGES = ("questions", "probe", "collect", "judge", "query", "library", "retriever", "thought", "model", "table")
FULL = dict(models=["smollm2-135m-instruct", "gemma-3-270m"], tasks=None, train_per_task=24, test_per_task=10,
            val_per_task=4, thought_ks=[1, 3], budget_tokens=1024,
            probe=3, min_tasks=4, max_new_tokens=96, routers=["router_knn", "router_mlp"], encoder="minilm",
            retriever_mode="finetune", epochs=3, student="smollm2-135m-instruct", students=["lora", "full"],
            shots=None, k=3, distill_max_length=512, judge="smollm2-135m-instruct", judge_sample=40,
            out=ROOT / "bench" / "out" / "fusion_e2e")
QUICK = dict(models=["tiny-llama"], tasks=["gsm8k", "mmlu"], train_per_task=8, test_per_task=4, probe=0,
             val_per_task=2, thought_ks=[1, 2], budget_tokens=256,
             min_tasks=2, max_new_tokens=8, routers=["router_knn"], encoder="hashing", retriever_mode="head",
             epochs=1, student="tiny-llama", students=["lora", "full"], shots=None, k=2, distill_max_length=128,
             judge="tiny-llama", judge_sample=4, out=ROOT / "bench" / "out" / "fusion_e2e_quick")
SEMANTIC = ("quick", "models", "tasks", "train_per_task", "test_per_task", "probe", "min_tasks", "max_new_tokens",
            "routers", "encoder", "retriever_mode", "epochs", "student", "students", "shots", "k",
            "distill_max_length", "summariser", "seed", "think", "judge", "judge_sample", "val_per_task",
            "thought_ks", "budget_tokens", "frozen", "thought_selection")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random model, a handful of questions (seconds)")
    ap.add_argument("--out", type=Path, help="output dir (default bench/out/fusion_e2e[_quick])")
    ap.add_argument("--models", nargs="+", help="zoo names (or HF paths) collected; default the zoo's two")
    ap.add_argument("--tasks", nargs="+", help="candidate tasks (default all 14; the probe keeps some)")
    for name, kind in (("train-per-task", int), ("test-per-task", int), ("val-per-task", int), ("probe", int),
                       ("min-tasks", int), ("budget-tokens", int),
                       ("max-new-tokens", int), ("epochs", int), ("shots", int), ("k", int), ("distill-max-length", int)):
        ap.add_argument(f"--{name}", type=kind)
    ap.add_argument("--routers", nargs="+", help="query-level recipes (default router_knn router_mlp)")
    ap.add_argument("--encoder", help="query/template encoder of every fit (minilm | hashing)")
    ap.add_argument("--retriever-mode", choices=["finetune", "head"])
    ap.add_argument("--student", help="the distilled student (a zoo name or HF path)")
    ap.add_argument("--students", nargs="*", choices=["lora", "full"], help="none given: no model stage")
    ap.add_argument("--thought-ks", nargs="+", type=int, help="the k grid of the thought mode selection on val")
    ap.add_argument("--thought-selection", choices=["cross_fit", "val"], default="cross_fit",
                    help="the thought mode selection's questions: val + train, cross-fitted (default), or val only")
    ap.add_argument("--no-frozen", dest="frozen", action="store_false",
                    help="no templates-with-the-frozen-encoder column")
    ap.add_argument("--judge", help="the zoo model of the LLM-judge check (none: skip it)")
    ap.add_argument("--judge-sample", type=int, help="train calls the judge grades")
    ap.add_argument("--summariser", help="a zoo model that summarises templates (default: the rule summariser)")
    ap.add_argument("--no-think", dest="think", action="store_false", help="no `_think` variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="local models' device (auto: CUDA when there is one)")
    ap.add_argument("--trainer", default="cpu", help="trainer config of the fits (cpu | gpu | default)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the table's CIs")
    ap.add_argument("--until", choices=STAGES, help="stop after this stage")
    ap.add_argument("--redo", choices=STAGES, help="redo this stage and every later one")
    ap.add_argument("--force", action="store_true", help="reuse OUT although its plan differs (stages are not redone)")
    a = ap.parse_args(argv)
    for key, value in (QUICK if a.quick else FULL).items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.shots is None:  # random few-shot shows as many examples as exemplars (like for like)
        a.shots = a.k
    return a


class Pipeline:
    def __init__(self, a: argparse.Namespace):
        self.a, self.out = a, Path(a.out).resolve()
        self.log_dir = self.out / "collect" / "log"
        self.sampling = {"max_new_tokens": a.max_new_tokens, "temperature": 0, "stop": ["\nUser:"]}  # base models go on

    # --- bookkeeping -------------------------------------------------------------------------------
    def check_plan(self) -> None:
        plan = {k: getattr(self.a, k) for k in SEMANTIC}
        f = self.out / "plan.json"
        if f.exists() and json.loads(f.read_text()) != json.loads(json.dumps(plan)) and not self.a.force:
            raise SystemExit(f"error: {self.out} was made with another plan ({f}); use another --out, or --force")
        self.out.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(plan, indent=1))
        if self.a.redo:
            for s in STAGES[STAGES.index(self.a.redo):]:  # their fits too: a redo trains again
                shutil.rmtree(self.out / s, ignore_errors=True)

    def done(self, stage: str) -> dict[str, Any] | None:
        f = self.out / stage / "stage.json"
        return json.loads(f.read_text()) if f.exists() else None

    def run(self) -> None:
        self.check_plan()
        for stage in STAGES:
            result = self.done(stage)
            if result is None:
                print(f"== {stage}", flush=True)
                start = time.perf_counter()
                result = getattr(self, f"stage_{stage}")()
                result["seconds"] = round(time.perf_counter() - start, 1)
                (self.out / stage).mkdir(parents=True, exist_ok=True)
                (self.out / stage / "stage.json").write_text(json.dumps(result, indent=1, default=str))
            else:
                print(f"== {stage}: done ({result['seconds']} s), skipped", flush=True)
            if stage == self.a.until:
                break
        times = {s: r["seconds"] for s in STAGES if (r := self.done(s))}
        (self.out / "timings.json").write_text(json.dumps(times | {"total": round(sum(times.values()), 1)}, indent=1))

    def data_overrides(self) -> list[str]:
        return ["data=llmfusionbench", f"data.path={self.log_dir}", f"encoder={self.a.encoder}", f"seed={self.a.seed}",
                f"trainer={self.a.trainer}", f"trainer.max_epochs={self.a.epochs}", "logger=none"]

    def logs(self):
        from fusion_lightning.data.datamodule import load_from_config

        return load_from_config({"format": "llmfusionbench", "path": str(self.log_dir)})

    def fit(self, recipe: str, run_dir: Path, extra: list[str]) -> Path:
        """A recipe on the log; its best checkpoint."""
        from fusion_lightning.config import compose_recipe
        from fusion_lightning.fit import fit

        done = run_dir / "summary.json"  # a finished fit (a later step of its stage failed) is not made again
        if done.exists() and json.loads(done.read_text()).get("artifacts", {}).get("best_checkpoint"):
            return run_dir / json.loads(done.read_text())["artifacts"]["best_checkpoint"]
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted fit starts over
        summary = fit(compose_recipe(recipe, [*self.data_overrides(), f"run_dir={run_dir}", *extra]))
        return run_dir / summary["artifacts"]["best_checkpoint"]

    def catalog(self, models: list[str]):
        """Prices of the collected models: zoo models by size (`python -m fusion_lightning.zoo catalog`), --quick's
        reference answerer free. A log's costs are all known or all null, so with any other model (an HF path,
        size unknown) nothing is priced."""
        from fusion_lightning.data.schema import ModelCatalog, ModelInfo
        from fusion_lightning.serving.local import _short_name
        from fusion_lightning.zoo import catalog, lookup, resolve

        llms = [m for m in models if m != _e2e.ReferenceBackend.name]
        if all(lookup(m) for m in llms):
            cat = catalog(llms)
            price = 0.0
        else:
            cat, price = ModelCatalog(source="unpriced: not every model is a zoo model"), None
        for m in models:
            if not (lookup(m) and price is not None):
                name = m if m == _e2e.ReferenceBackend.name else _short_name(resolve(m))  # as LocalBackend names it
                for variant, base in ((name, None), (name + "_think", name)):
                    cat.add(ModelInfo(variant, input_price=price, output_price=price, base_model=base))
        return cat

    def backend(self, model: str, progress: bool = False) -> dict[str, Any]:
        """`progress`: a bar per generate call (the thought stage: an hour and more of generation on CPU;
        collect has its own bar per call)."""
        return {"type": "local", "model": model, "device": self.a.device, "progress": progress}

    def evaluate(self, **live):
        from fusion_lightning.fusion_table import evaluate

        return evaluate(self.logs(), split="test", seed=self.a.seed, sampling=self.sampling, **live)

    # --- stages ------------------------------------------------------------------------------------
    def stage_questions(self) -> dict[str, Any]:
        pools, notes = _e2e.question_pools(SHARED)
        if not pools:
            raise SystemExit(f"error: no shared questions under {SHARED} (set FUSION_LIGHTNING_SHARED_DATA)")
        tasks = self.a.tasks or sorted({t for t, _ in pools})
        missing = [t for t in tasks if (t, "train") not in pools or (t, "test") not in pools]
        if missing:
            raise SystemExit(f"error: task(s) {missing} have no shared train/test questions; have {sorted({t for t, _ in pools})}")
        counts = {}
        for split, n in (("train", self.a.train_per_task), ("test", self.a.test_per_task)):
            rows = [r for t in tasks for r in _e2e.sample(pools[(t, split)], n, self.a.seed)]
            _e2e.write_jsonl(self.out / "questions" / f"{split}.jsonl", rows)
            counts[split] = len(rows)
        if self.a.val_per_task:  # from the train pool, none of the train sample's
            train = {r["query"] for r in _e2e.read_jsonl(self.out / "questions" / "train.jsonl")}
            rows = [r for t in tasks
                    for r in _e2e.sample([x for x in pools[(t, "train")] if x["query"] not in train],
                                         self.a.val_per_task, self.a.seed)]
            _e2e.write_jsonl(self.out / "questions" / "val.jsonl", rows)
            counts["val"] = len(rows)
        return {"tasks": tasks, "counts": counts, "notes": notes}

    def stage_probe(self) -> dict[str, Any]:
        tasks = self.done("questions")["tasks"]
        if not self.a.probe:
            return {"tasks": tasks, "probe": "skipped (--probe 0): all candidate tasks kept"}
        from fusion_lightning.serving.make_log import collect, read_query_file

        qs = read_query_file(self.out / "questions" / "train.jsonl")
        per: dict[str, list] = {}
        for q in qs:
            per.setdefault(q.task, []).append(q)
        probe = [q for t in sorted(per) for q in per[t][: self.a.probe]]
        log = self.out / "probe" / "calls_train.jsonl"
        collect(probe, [self.backend(m) for m in self.a.models], log, sampling=self.sampling,
                catalog=self.catalog(self.a.models))
        kept, means = _e2e.choose_tasks(log, self.a.min_tasks)
        return {"tasks": kept, "scores": means, "probe_questions": len(probe)}

    def stage_collect(self) -> dict[str, Any]:
        from fusion_lightning.serving.make_log import collect, read_query_file

        tasks = set(self.done("probe")["tasks"])
        self.log_dir.mkdir(parents=True, exist_ok=True)
        probe_log, train_log = self.out / "probe" / "calls_train.jsonl", self.log_dir / "calls_train.jsonl"
        if probe_log.exists() and not train_log.exists():  # the probe's calls of kept tasks are not made twice
            _e2e.write_jsonl(train_log, _e2e.priced([r for r in _e2e.read_jsonl(probe_log) if r["task_name"] in tasks],
                                                    self.catalog(self.a.models)))
        backends: list[Any] = [self.backend(m) for m in self.a.models]
        reports = {}
        for split in [s for s in ("train", "val", "test") if (self.out / "questions" / f"{s}.jsonl").exists()]:
            qs = [q for q in read_query_file(self.out / "questions" / f"{split}.jsonl") if q.task in tasks]
            if self.a.quick:
                backends = [*backends[: len(self.a.models)], _e2e.ReferenceBackend([vars(q) for q in qs])]
            r = collect(qs, backends, self.log_dir / f"calls_{split}.jsonl", think=self.a.think, sampling=self.sampling,
                        catalog=self.catalog([b if isinstance(b, str) else b.name for b in
                                              [*self.a.models, *backends[len(self.a.models):]]]))
            reports[split] = {"questions": len(qs), "written": r.written, "skipped": r.skipped, "failed": r.failed,
                              "per_model": r.per_model, "notes": r.notes}
        return reports

    def stage_judge(self) -> dict[str, Any]:
        """Whether a zoo model can be the log's LLM judge: the share of its grades that parse (the issue's
        bar is 80 %) and, of those, how often "correct" (grade > 0) agrees with the task score > 0."""
        if not self.a.judge or self.a.judge == "none" or not self.a.judge_sample:
            return {"skipped": "no --judge"}
        from fusion_lightning.serving import build_backend
        from fusion_lightning.serving.judge import judge_responses

        calls = _e2e.sample(_e2e.read_jsonl(self.log_dir / "calls_train.jsonl"), self.a.judge_sample, self.a.seed,
                            key=lambda r: (r["query_id"], r["llm"]))
        result = judge_responses(build_backend(self.backend(self.a.judge)), [r["query"] for r in calls],
                                 [r["ground_truth"] for r in calls], [r["response"] for r in calls], temperature=0)
        parsed = [(g, float(r["performance"])) for g, r in zip(result.scores, calls, strict=True)
                  if g is not None and (r["response"] or "").strip()]  # an empty answer is 0 without a call
        asked = len(calls) - sum(1 for r in calls if not (r["response"] or "").strip())  # empty answers: no call
        unread = result.unparseable + result.failed
        _e2e.write_jsonl(self.out / "judge" / "judgements.jsonl", [
            {"query_id": r["query_id"], "llm": r["llm"], "performance": r["performance"], "judge": g, "raw": raw}
            for r, g, raw in zip(calls, result.scores, result.raw, strict=True)])
        rate = 1 - unread / asked if asked else float("nan")
        return {"judge": self.a.judge, "calls": len(calls), "judge_calls": asked, "parse_rate": round(rate, 3),
                "meets_80pct": bool(rate >= 0.8),
                "agreement": round(float(np.mean([(g > 0) == (p > 0) for g, p in parsed])), 3) if parsed else None,
                "note": "the log keeps the task scores only: the judge's grades are not written into it"
                        + ("" if rate >= 0.8 else f" (its grades parse for {rate:.0%} of calls, under the 80 % bar)")}

    def stage_query(self) -> dict[str, Any]:
        return {"routers": {r: str(self.fit(r, self.out / "query" / r, [])) for r in self.a.routers}}

    def stage_library(self) -> dict[str, Any]:
        from fusion_lightning.templates import compose_build, run_build

        lib = self.out / "library" / "lib"
        backend = ["backend=rule"] if not self.a.summariser else [
            "backend=local", f"backend.model={self.a.summariser}", f"+backend.device={self.a.device}"]
        cfg = compose_build(["data=llmfusionbench", f"data.path={self.log_dir}", f"out={lib}", "split=train",
                             f"encoder={self.a.encoder}", *backend])
        result = run_build(cfg, progress=False)
        from fusion_lightning.thought.library import TemplateLibrary

        n = len(TemplateLibrary.load(lib)) if (lib / "templates.jsonl").exists() else 0
        return {"library": str(lib), "templates": n, "report": result["report"].lines(), "summariser": result["summariser"],
                "llm_summariser_check": self.summariser_check()}

    def summariser_check(self) -> dict[str, Any]:
        """Whether the judge's zoo model can be the LLM summariser: the share of `--judge-sample // 4`
        train questions whose template JSON it writes parseably (one retry, as `templates` allows)."""
        n = (self.a.judge_sample or 0) // 4
        if self.a.summariser or not self.a.judge or self.a.judge == "none" or not n:
            return {"skipped": "--summariser given, or no --judge"}
        from fusion_lightning.serving import build_backend
        from fusion_lightning.thought.select import TemplateSelection, select_for_templates
        from fusion_lightning.thought.summarise import LLMSummariser

        groups, _ = select_for_templates(self.logs().select("train"), TemplateSelection())
        picked = _e2e.sample([{"g": g, "q": q} for q, g in groups.items()], n, self.a.seed, key=lambda r: r["q"])
        results = LLMSummariser(build_backend(self.backend(self.a.judge)), retries=1).summarise([r["g"] for r in picked])
        ok = sum(r.parts is not None for r in results)
        return {"model": self.a.judge, "questions": len(results), "parsed": ok,
                "parse_rate": round(ok / len(results), 3) if results else None,
                "errors": sorted({(r.error or "")[:80] for r in results if r.parts is None})[:5]}

    def stage_retriever(self) -> dict[str, Any]:
        if not self.done("library")["templates"]:
            return {"skipped": "the template library is empty: no train question has a correct response"}
        extra = [f"datamodule.library_dir={self.done('library')['library']}", f"model.mode={self.a.retriever_mode}"]
        run_dir = self.out / "retriever" / "run"
        ckpt = self.fit("template_retriever", run_dir, extra)
        metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
        return {"checkpoint": str(ckpt), "metrics": {k: v for k, v in metrics.items() if k.startswith("test/")}}

    def stage_thought(self) -> dict[str, Any]:
        from fusion_lightning.thought.prompt import per_task_exceptions

        lib, ckpt = self.done("library")["library"], self.done("retriever").get("checkpoint")
        files, selected = {}, {}
        modes = ["zero_shot", "few_shot"]
        for m in self.a.models:
            start = time.perf_counter()
            # random few-shot like for like with exemplars: as many examples (shots = k by default), drawn from
            # the pool exemplars retrieves from (the library's, same task filter), the same prompt and token budget
            cfg = {"backend": self.backend(m, progress=True), "shots": self.a.shots, "k": self.a.k, "budget_tokens": self.a.budget_tokens,
                   **({"library": lib} if ckpt else {})}
            modes = ["zero_shot", "few_shot"]
            if ckpt:  # no library: no template columns
                entry = self.select_thought(m, lib, ckpt)
                selected[entry["model"]] = {k: entry[k] for k in ("mode", "k", "questions", "questions_by_split",
                                                                  "cross_fit", "seconds", "z")}
                exceptions = per_task_exceptions(entry)
                selected[entry["model"]]["per_task_exceptions"] = exceptions
                shown = "none (zero-shot)" if entry["mode"] == "none" else f"{entry['mode']}@{entry['k']}"
                shown += "".join(f"; {c} on {t}" for t, c in sorted(exceptions.items()))
                print(f"   {entry['model']}: val selected {shown} ({entry['seconds']} s)", flush=True)
                modes += ["templates", "exemplars", "both", "selected"]
            ev = self.evaluate(thought={**cfg, "retriever_ckpt": ckpt, "modes": modes})
            if ckpt and self.a.frozen:
                frozen = self.evaluate(thought={**cfg, "modes": ["templates"]})
                ev.add("thought:templates_frozen", "thought", *frozen.columns["thought:templates"])
                modes.append("templates_frozen")
            name = ev.info["thought_backend"]
            f = self.out / "thought" / f"{name}.json"
            _e2e.save_columns(f, ev, {f"thought:{x}": f"thought:{name}:{x}" for x in modes}, time.perf_counter() - start)
            files[name] = str(f)
        return {"columns": files, "modes": modes, "selected": selected}

    def select_thought(self, model: str, lib: str, ckpt: str) -> dict[str, Any]:
        """recipe thought_auto's step for one zoo model: modes x k on the selection questions, router_auto's paired
        test against zero-shot; the choice merged into the library's thought_selection.json. `--thought-selection
        cross_fit` (the default): val + train questions, each train question leave-own-out and answered through
        a fold retriever (`template_retriever` fitted without its fold: `retriever/fold<f>`); `val`: val only."""
        from fusion_lightning.callbacks.thought_selection import cross_fit_plan, select_thought
        from fusion_lightning.serving import build_backend
        from fusion_lightning.thought.auto import fold_of, selection_questions, write_selection
        from fusion_lightning.thought.prompt import TemplateAugmenter

        def load(c: str) -> TemplateAugmenter:
            return TemplateAugmenter.load(lib, c, k=self.a.k, budget_tokens=self.a.budget_tokens)

        logs, aug = self.logs(), load(ckpt)
        train = selection_questions(logs, ("train",))
        use, why = cross_fit_plan("auto" if self.a.thought_selection == "cross_fit" else False, "val", FOLDS, len(train))
        questions = selection_questions(logs, ("val", "train") if use else ("val",))
        augmenter_for = None
        if use:
            folds = [load(str(c)) for c in self.fold_retrievers()]

            def augmenter_for(q):
                return folds[fold_of(q.query_id, FOLDS, self.a.seed)] if q.split == "train" else aug
        backend = build_backend(self.backend(model, progress=True))
        entry = select_thought(aug, backend, questions, ks=self.a.thought_ks, budget_tokens=self.a.budget_tokens,
                               sampling=self.sampling, retriever=ckpt, augmenter_for=augmenter_for, cross_fit=why)
        write_selection(entry, backend.name, lib, self.out / "thought")
        return {**entry, "model": backend.name}

    def fold_retrievers(self) -> list[Path]:
        """The retriever fitted `FOLDS` times, each time without one fold's train questions (cached per fold)."""
        extra = [f"datamodule.library_dir={self.done('library')['library']}", f"model.mode={self.a.retriever_mode}",
                 f"++datamodule.cross_fit_folds={FOLDS}", f"++datamodule.cross_fit_seed={self.a.seed}"]
        return [self.fit("template_retriever", self.out / "retriever" / f"fold{f}", [*extra, f"++datamodule.cross_fit_fold={f}"])
                for f in range(FOLDS)]

    def stage_model(self) -> dict[str, Any]:
        from fusion_lightning.export import export_student

        if not _e2e.solved_train_queries(self.logs()):
            return {"columns": {}, "skipped": "no train question has a correct response to distil"}
        files = {}
        for variant in self.a.students:
            start = time.perf_counter()
            run_dir = self.out / "model" / variant
            ckpt = self.fit("distill_top_k", run_dir / "run", [
                "student=hf", f"student.name_or_path={self.a.student}", f"model=student_{variant}",
                "callbacks.student_eval=null", f"datamodule.max_length={self.a.distill_max_length}"])
            student = export_student(ckpt, run_dir / "student", merge=True)
            ev = self.evaluate(student={"model": str(student), "name": f"student_{variant}", "device": self.a.device,
                                        "progress": False})
            f = run_dir / "columns.json"
            _e2e.save_columns(f, ev, {f"student:student_{variant}": f"student:{variant}"}, time.perf_counter() - start)
            files[variant] = str(f)
        return {"columns": files, "student": self.a.student}

    def stage_table(self) -> dict[str, Any]:
        from fusion_lightning.evaluate import write_report

        logs = self.logs()
        ev = self.evaluate(routers={r.removeprefix("router_"): c for r, c in self.done("query")["routers"].items()})
        for f in [*self.done("thought")["columns"].values(), *self.done("model")["columns"].values()]:
            _e2e.load_columns(Path(f), ev)
        ev.notes += [f"{st} stage skipped: {r['skipped']}" for st in STAGES if "skipped" in (r := self.done(st) or {})]
        ev.notes = list(dict.fromkeys(ev.notes))  # one line per note, not one per model
        table = self.out / "table"
        table.mkdir(parents=True, exist_ok=True)
        summary = write_report(ev, table, logs.summary(), n_boot=self.a.bootstrap, seed=self.a.seed)
        lines, gains = [f"# Gains ({ev.split} split, {len(ev.tasks)} questions)", ""], {}
        from fusion_lightning.zoo import lookup

        zoo_model = lookup(self.a.student)  # the log names a zoo model by its canonical name, a directory by its last part
        base = zoo_model.name if zoo_model else Path(self.a.student.rstrip("/")).name
        thought = self.done("thought")
        for name in thought["columns"]:
            c = f"thought:{name}"
            every = [f"{c}:{x}" for x in ("few_shot", "templates", "templates_frozen", "exemplars", "both", "selected")]
            chosen = thought.get("selected", {}).get(name)
            if chosen:
                per_task = "".join(f"; `{c}` on {t}" for t, c in sorted(chosen.get("per_task_exceptions", {}).items()))
                lines += [f"**{name}: val selected `{chosen['mode']}" + ("" if chosen["mode"] == "none" else f"@{chosen['k']}")
                          + f"`{per_task}** ({chosen['questions']} questions: "
                          + ", ".join(f"{n} {sp}" for sp, n in chosen.get("questions_by_split", {"val": chosen["questions"]}).items())
                          + f"; {chosen.get('cross_fit') or 'val only'}; router_auto's paired test at z = "
                          f"{chosen['z']:.2f}; the column `selected`)", ""]
            for title, ref, cols in ((f"{name}: thought modes vs zero-shot", f"{c}:zero_shot", every),
                                     (f"{name}: thought modes vs best single", "best_single", [f"{c}:zero_shot", *every]),
                                     (f"{name}: retrieved exemplars vs random few-shot", f"{c}:few_shot",
                                      [f"{c}:exemplars", f"{c}:both", f"{c}:selected"]),
                                     (f"{name}: trained vs frozen retriever", f"{c}:templates_frozen", [f"{c}:templates"])):
                cols = [x for x in cols if x in ev.columns]
                if ref not in ev.columns or not cols:
                    continue
                rows = _e2e.gain_rows(ev, ref, cols, self.a.bootstrap, self.a.seed)
                lines += _e2e.gain_markdown(title, ref, cols, rows)
                gains[title] = [{k: v for k, v in r.items() if k in ("row", "queries") or k.endswith(("_diff", "_lo", "_hi"))}
                                for r in rows]
        students = [f"student:{v}" for v in self.done("model")["columns"]]
        if base in ev.columns and students:
            rows = _e2e.gain_rows(ev, base, students, self.a.bootstrap, self.a.seed)
            lines += _e2e.gain_markdown(f"students vs their base ({base}, zero-shot, from the log)", base, students, rows)
            gains["students"] = [{k: v for k, v in r.items() if k in ("row", "queries") or k.endswith(("_diff", "_lo", "_hi"))}
                                 for r in rows]
        (table / "gains.md").write_text("\n".join(lines) + "\n")
        (table / "gains.json").write_text(json.dumps(gains, indent=1, default=str))
        print((table / "fusion_table.md").read_text())
        print("\n".join(lines))
        return {"table": str(table), "overall": summary["overall"], "best_single_model": ev.info["best_single_model"],
                "thought_selected": thought.get("selected", {})}


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if not a.quick and not a.think:
        print("note: --no-think: two LLMs per zoo model become one", file=sys.stderr)
    Pipeline(a).run()
    print(f"output: {Path(a.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
