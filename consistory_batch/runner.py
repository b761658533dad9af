"""`consistory batch`: from a spec to DEST, resumably, on a pool of model actors.

Why plain actors and not Ray Data: a story is already a batch (all its prompts in one UNet
batch), so there are no rows to stream or batch across; what a story needs is a loaded pipeline,
a place to write, and for `--mode anchors` a dependency (anchors, then new images from a cache
that must move between actors by reference, never through dataset blocks). Plain actors with a
small driver-side queue give that, decide exactly where a dead actor's story is retried, and
keep the progress bar and the manifest in the driver, with Ray core as the only dependency.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

from consistory.cli.options import build_config
from consistory.errors import InputError, UsageError
from consistory.loading import resolve_model

from .destination import parse_destination
from .manifest import Manifest
from .plans import StoryPlan, plan_stories
from .progress import BatchProgress
from .scheduler import ACTOR_RESTARTS, BatchAborted, Scheduler, Slot
from .specs import read_spec


def _say(message: str) -> None:
    print(f"consistory: {message}", file=sys.stderr, flush=True)


def run_batch(args: argparse.Namespace, on_event: Callable[..., None] | None = None) -> int:
    """0 when every story of the spec is done, 1 when some failed (the manifest says why)."""
    import ray

    from .ray_session import choose_device, connect, default_actor_count

    destination = parse_destination(args.out)
    specs, problems = read_spec(args.spec, args.seed)
    model = resolve_model(args.model)
    try:
        build_config(args, model)  # the command line's own settings, checked once for every story
    except InputError as error:
        raise UsageError(str(error)) from None
    from consistory.loading import load_tokenizer, locate_model, resolve_dtype

    cache_only = locate_model(model)  # an unreachable hub fails here, in seconds, before Ray starts
    started_ray = connect(args.address)
    try:
        device = choose_device(args.device)
        dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
        plans, plan_problems = plan_stories(specs, args, model, dtype, load_tokenizer(model, cache_only))
        store = destination.open()
        manifest = Manifest.load(store, str(args.spec))
        for problem in problems + plan_problems:
            manifest.record_problem(problem)
        finished = manifest.finished(plans)
        manifest.order([s.id for s in specs])
        todo = [p for p in plans if p.id not in finished]
        bad = len(problems) + len(plan_problems)
        _say(f"{len(specs) + len(problems)} stories in {args.spec}: {len(finished)} already "
             f"done, {len(todo)} to make, {bad} with problems; writing to {destination.url}")
        scheduler, slots, started = None, [], time.monotonic()
        if todo:
            actors = min(args.actors or default_actor_count(device), _parts(todo, args))
            slots = _start_actors(actors, model, device, cache_only, args, destination, started_ray)
            progress = BatchProgress(len(todo), sum(len(p.spec.prompts) for p in todo), len(slots),
                                     enabled=not args.no_progress)
            scheduler = Scheduler(slots, todo, manifest, destination, args.mode, args.extend_batch, args.attempts,
                                  progress, on_event)
            try:
                scheduler.run()
            except BatchAborted as error:
                raise OSError(str(error)) from None  # one line, exit 1; the manifest below keeps what was done
            finally:
                progress.close()
                manifest.summary = _summary(args, model, device, specs, problems, bad, finished, scheduler, slots,
                                            started)
                manifest.write()
                for slot in slots:
                    ray.kill(slot.handle)
        else:
            manifest.summary = _summary(args, model, device, specs, problems, bad, finished, None, [], started)
            manifest.write()
    finally:
        if started_ray:
            ray.shutdown()
    _report(manifest, destination.url, {s.id for s in specs} | {p.id for p in problems if p.id})
    return 0 if manifest.summary["failed"] == 0 else 1


def _parts(todo: list[StoryPlan], args: argparse.Namespace) -> int:
    """Actor calls the work splits into: no point starting more actors than that."""
    if args.mode == "story":
        return len(todo)
    return sum(1 + -(-(len(p.spec.prompts) - p.n_anchors) // args.extend_batch) for p in todo)


def _start_actors(count, model, device, cache_only, args, destination, started_ray) -> list[Slot]:
    import ray

    from .model_actor import StoryActor
    from .ray_session import check_room

    gpus = 1 if device == "cuda" else 0
    check_room(count, args.cpus_per_actor, gpus, strict=started_ray)
    threads = args.torch_threads or max(1, int(args.cpus_per_actor))
    actor = ray.remote(StoryActor).options(num_cpus=args.cpus_per_actor, num_gpus=gpus,
                                           max_restarts=ACTOR_RESTARTS, max_task_retries=0)
    _say(f"starting {count} model actor(s) ({model} on {device}, {args.cpus_per_actor:g} CPU"
         f"{' + 1 GPU' if gpus else ''}, {threads} torch thread(s) each)")
    return [Slot(i, actor.remote(model, device, cache_only, threads, destination)) for i in range(count)]


def _summary(args, model, device, specs, problems, bad, finished, scheduler, slots, started) -> dict[str, Any]:
    now = time.monotonic()
    ready = [s.ready_at for s in slots if s.ready_at is not None]
    generating_s = now - min(ready) if ready else 0.0
    replicas = [
        {"actor": s.index, "images": s.images, "deaths": s.deaths,
         "load_s": round(s.info["load_s"], 2) if s.info else None,
         "images_per_s": round(s.images / (now - s.ready_at), 4) if s.ready_at and now > s.ready_at else 0.0}
        for s in slots
    ]
    images = scheduler.images if scheduler else 0
    total = len(specs) + len(problems)
    done = scheduler.done if scheduler else 0
    failed = bad + (scheduler.failed if scheduler else 0)
    return {
        "model": model, "device": device, "mode": args.mode, "stories": total, "made": done,
        "already_done": len(finished), "failed": failed,
        "not_run": total - len(finished) - done - failed,  # left when every actor died; a rerun makes them
        "images": images,
        "retries": scheduler.retries if scheduler else 0, "replicas": len(slots),
        "seconds": round(now - started, 2), "generating_s": round(generating_s, 2),
        "images_per_s": round(images / generating_s, 4) if generating_s else 0.0,
        "images_per_s_per_replica": round(images / generating_s / len(slots), 4) if generating_s else 0.0,
        "per_replica": replicas,
    }


def _report(manifest: Manifest, where: str, ids: set[str]) -> None:
    s = manifest.summary
    print(f"{s['stories']} stories: {s['made']} made, {s['already_done']} already done, {s['failed']} failed; "
          f"{s['images']} images in {s['generating_s']:.1f} s on {s['replicas']} model replica(s) "
          f"({s['images_per_s_per_replica']:.3g} images/s per replica, {s['retries']} retries)")
    failed = [st for st in manifest.stories.values() if st["id"] in ids and st.get("status") == "failed"]
    failed += manifest.problems
    for story in failed[:20]:
        print(f"  failed: {story['error']}" if "id" not in story else f"  failed {story['id']}: {story['error']}")
    if len(failed) > 20:
        print(f"  ... and {len(failed) - 20} more (see the manifest)")
    print(f"manifest: {where.rstrip('/')}/manifest.json")
