"""Search the schedule space with optuna (seeded TPE), scoring each candidate by the throughput
the cost model predicts: tokens per iteration / predicted iteration time.

The space: the dense batch size (bounded by what the KV cache holds for the workload, and by the
engine's limit on running sequences), 1-4 nano-batches with decode and prefill shares chosen
separately, the SMs of each unit (any count under CTA limits, multiples of 8 for green
contexts), where prefill attention and the small memory-bound ops run, and the launch order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import optuna

from nanoflow.autotune.cost_model import predict
from nanoflow.autotune.memory import kv_fits
from nanoflow.autotune.steady_state import WorkloadShape, steady_batch
from nanoflow.autotune.tables import OpTables
from nanoflow.models.spec import ModelSpec
from nanoflow.runtime.graph import DECODE_ATTENTION, Resource, Rows, llama_graph
from nanoflow.runtime.schedule import (
    LaunchOrder,
    Mechanism,
    PipelineSchedule,
    UnitSpec,
    default_overlapped_schedule,
    sequential_schedule,
)

GREEN_CONTEXT_STEP = 8
# the memory-bound ops over all rows (norms, RoPE, SiLU-mul): where they run is one choice
SMALL_MEMORY_OPS = llama_graph().names_where(Resource.MEMORY, Rows.ALL)
MAX_NANO_BATCHES = 4


@dataclass(frozen=True)
class Candidate:
    dense_batch_size: int
    schedule: PipelineSchedule
    predicted_iteration_s: float

    @property
    def predicted_tokens_per_s(self) -> float:
        return self.dense_batch_size / self.predicted_iteration_s


@dataclass(frozen=True)
class SearchSpace:
    sm_count: int
    mechanisms: tuple[str, ...]
    min_batch: int
    max_batch: int
    batch_step: int = 64
    has_network: bool = False
    cuda_graphs: bool = False  # iterations replayed from graphs: no host launch bound
    shared: bool = False  # also try the shared-SM layout (its interference was measured)


def batch_limit(
    spec: ModelSpec,
    tables: OpTables,
    shape: WorkloadShape,
    max_num_seqs: int = 512,
    step: int = 64,
    limit: int = 16384,
) -> int:
    """The largest dense batch (a multiple of ``step``) whose steady state fits the KV cache
    and keeps at most ``max_num_seqs`` sequences running; 0 if none does."""
    best = 0
    for size in range(step, limit + 1, step):
        batch = steady_batch(size, shape)
        running = batch.decodes + math.ceil(batch.prefill_tokens / max(1.0, shape.input_len))
        fits = kv_fits(
            spec,
            tables.gpu_memory_bytes,
            shape,
            size,
            dtype_bytes=tables.dtype_bytes,
            kv_dtype_bytes=tables.kv_element_bytes,
        )
        if running > max_num_seqs or not fits:
            break
        best = size
    return best


def _shares(trial: optuna.Trial, kind: str, n: int) -> tuple[float, ...]:
    weights = [trial.suggest_float(f"{kind}_w{i}", 0.1, 1.0) for i in range(n)]
    total = sum(weights)
    shares = [w / total for w in weights[:-1]]
    return (*shares, 1.0 - sum(shares))


def _unit_sms(trial: optuna.Trial, space: SearchSpace, mechanism: Mechanism) -> list[UnitSpec]:
    step = GREEN_CONTEXT_STEP if mechanism is Mechanism.GREEN_CONTEXT else 1
    total = space.sm_count // step * step if step > 1 else space.sm_count
    network = 0
    if space.has_network:
        network = trial.suggest_int("network_sms", 8, 32, step=step)
    low = max(step, (total // 4) // step * step)
    compute = trial.suggest_int("compute_sms", low, total - network - step, step=step)
    units = [UnitSpec("compute", compute), UnitSpec("memory", space.sm_count - compute - network)]
    if network:
        units.append(UnitSpec("network", network))
    return units


def _shared_layout(trial: optuna.Trial, space: SearchSpace, n: int) -> PipelineSchedule:
    """GEMMs and the small memory-bound ops keep the whole GPU; decode attention runs beside
    them, CTA-limited, on a high-priority stream (the layout of ``--executor overlapped``)."""
    attention = trial.suggest_int("attention_sms", 8, space.sm_count)
    return PipelineSchedule(
        decode_shares=_shares(trial, "decode", n),
        prefill_shares=_shares(trial, "prefill", n),
        units=(UnitSpec("compute"), UnitSpec("attention", attention, priority=-1)),
        op_units={r.value: "compute" for r in Resource} | {DECODE_ATTENTION: "attention"},
        launch_order=LaunchOrder(
            trial.suggest_categorical("launch_order", [o.value for o in LaunchOrder])
        ),
        mechanism=Mechanism.CTA_LIMIT,
        overlap=True,
    )


def schedule_of(trial: optuna.Trial, space: SearchSpace) -> PipelineSchedule:
    """The schedule a trial's parameters describe (define-by-run: 1 nano-batch asks no more)."""
    n = trial.suggest_int("nano_batches", 1, MAX_NANO_BATCHES)
    if n == 1:
        return sequential_schedule()
    if space.shared and trial.suggest_categorical("layout", ["partitioned", "shared"]) == "shared":
        return _shared_layout(trial, space, n)
    mechanism = Mechanism(trial.suggest_categorical("mechanism", list(space.mechanisms)))
    units = _unit_sms(trial, space, mechanism)
    op_units = {
        Resource.COMPUTE.value: "compute",
        Resource.MEMORY.value: "memory",
        Resource.NETWORK.value: "network" if space.has_network else "compute",
    }
    op_units["prefill_attention"] = trial.suggest_categorical(
        "prefill_attention_unit", ["compute", "memory"]
    )
    if trial.suggest_categorical("small_memory_ops_unit", ["memory", "compute"]) == "compute":
        op_units |= dict.fromkeys(SMALL_MEMORY_OPS, "compute")
    return PipelineSchedule(
        decode_shares=_shares(trial, "decode", n),
        prefill_shares=_shares(trial, "prefill", n),
        units=tuple(units),
        op_units=op_units,
        launch_order=LaunchOrder(
            trial.suggest_categorical("launch_order", [o.value for o in LaunchOrder])
        ),
        mechanism=mechanism,
        overlap=True,
    )


def make_objective(tables: OpTables, shape: WorkloadShape, space: SearchSpace):
    def objective(trial: optuna.Trial) -> float:
        dense = trial.suggest_int(
            "dense_batch_size", space.min_batch, space.max_batch, step=space.batch_step
        )
        schedule = schedule_of(trial, space)
        predicted = predict(
            tables, schedule, steady_batch(dense, shape), launch_bound=not space.cuda_graphs
        )
        trial.set_user_attr("predicted_iteration_s", predicted.iteration_s)
        trial.set_user_attr("schedule", schedule.to_dict())
        return dense / predicted.iteration_s

    return objective


def _baselines(space: SearchSpace) -> list[dict]:
    """The hand-written schedules, tried first so the search never ends up worse than them
    (by prediction; the tuner's validation then measures the best candidates)."""
    default = default_overlapped_schedule(space.sm_count)
    units = {u.name: u.num_sms for u in default.units}
    overlapped = {
        "dense_batch_size": space.max_batch,
        "nano_batches": 2,
        "mechanism": Mechanism.CTA_LIMIT.value,
        "compute_sms": units["compute"],
        "prefill_attention_unit": "compute",
        "small_memory_ops_unit": "memory",
        "decode_w0": 1.0,
        "decode_w1": 1.0,
        "prefill_w0": 1.0,
        "prefill_w1": 1.0,
        "launch_order": LaunchOrder.OP_MAJOR.value,
    }
    sequential = {"dense_batch_size": space.max_batch, "nano_batches": 1}
    if Mechanism.CTA_LIMIT.value not in space.mechanisms or space.has_network:
        return [sequential]
    if not space.shared:
        return [sequential, overlapped]
    equal = {f"{kind}_w{i}": 1.0 for kind in ("decode", "prefill") for i in range(2)}
    shared = {
        "dense_batch_size": space.max_batch,
        "nano_batches": 2,
        "layout": "shared",
        "attention_sms": space.sm_count // 2,  # as in shared_sm_schedule
        "launch_order": LaunchOrder.ALTERNATING.value,
    } | equal
    return [sequential, overlapped | {"layout": "partitioned"}, shared]


def run_search(
    tables: OpTables,
    shape: WorkloadShape,
    space: SearchSpace,
    trials: int = 200,
    seed: int = 0,
    storage: str | None = None,
    study_name: str = "nanoflow-tune",
    progress: bool = True,
) -> optuna.Study:
    """A finished study; ``storage`` (e.g. ``sqlite:///tune.db``) keeps it for optuna-dashboard."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=seed),
        direction="maximize",
        load_if_exists=True,
    )
    for params in _baselines(space):
        study.enqueue_trial(params, skip_if_exists=True)
    study.optimize(
        make_objective(tables, shape, space), n_trials=trials, show_progress_bar=progress
    )
    logging.getLogger(__name__).info("best predicted throughput %.0f tokens/s", study.best_value)
    return study


def top_candidates(study: optuna.Study, k: int) -> list[Candidate]:
    """The ``k`` best distinct (dense batch, schedule) pairs, best first."""
    done = [t for t in study.trials if t.state is optuna.trial.TrialState.COMPLETE]
    seen: set[str] = set()
    out: list[Candidate] = []
    for trial in sorted(done, key=lambda t: t.value, reverse=True):
        schedule = PipelineSchedule.from_dict(trial.user_attrs["schedule"])
        key = f"{trial.params['dense_batch_size']}:{sorted(schedule.to_dict().items())}"
        if key in seen:
            continue
        seen.add(key)
        out.append(
            Candidate(
                trial.params["dense_batch_size"],
                schedule,
                trial.user_attrs["predicted_iteration_s"],
            )
        )
        if len(out) == k:
            break
    return out
