"""Typed, validated view of ``params.yaml``.

Every section is a pydantic model that forbids unknown keys, so a typo fails at once with
the key's dotted path in the message. Stages call :func:`load_params` before touching any
output, so a bad value never destroys earlier results.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from maprl.errors import ParamsError

HPARAM_KEYS = (
    "learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda",
    "clip_range", "ent_coef", "vf_coef", "max_grad_norm",
)  # fmt: skip
"""The ``train`` keys an Optuna study may tune (``tune.space``; also ``one_minus_gamma``)."""
INT_HPARAMS = ("n_steps", "batch_size", "n_epochs")


class _Section(BaseModel):
    # allow_inf_nan=False: NaN and infinity are rejected everywhere, naming the key
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseParams(_Section):
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for every random choice in the pipeline.")


class EarthEngineParams(_Section):
    project: str | None = Field(None, description="Google Cloud project registered for Earth Engine.")
    credentials: Literal["persistent", "service_account"] = "persistent"
    service_account: str | None = Field(None, description="Service-account e-mail (credentials: service_account).")
    key_file: str | None = Field(None, description="Service-account JSON key (credentials: service_account).")
    bbox: tuple[float, float, float, float] = Field(
        (6.60, 46.50, 6.66, 46.54), description="west, south, east, north in degrees (EPSG:4326)."
    )
    start_date: str = "2023-05-01"
    end_date: str = "2023-09-30"
    collection: Literal["sentinel2", "naip"] = "sentinel2"
    dem: Literal["srtm", "glo30"] = "glo30"
    scale: float = Field(10.0, gt=0, le=1000, description="Ground sample distance of the download, metres.")
    cloud_score_min: float = Field(0.6, ge=0, le=1, description="Cloud Score+ cs_cdf threshold (keep >=).")
    max_request_px: int = Field(1024, ge=16, le=32768, description="Tile side per computePixels request.")
    max_retries: int = Field(5, ge=0, le=20)

    @model_validator(mode="after")
    def _check(self) -> EarthEngineParams:
        w, s, e, n = self.bbox
        if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
            raise ValueError("bbox must be west < east and south < north, in degrees")
        if self.credentials == "service_account" and not (self.service_account and self.key_file):
            raise ValueError("credentials: service_account needs both service_account and key_file")
        start, end = _iso_date("start_date", self.start_date), _iso_date("end_date", self.end_date)
        if start >= end:
            raise ValueError(f"start_date {self.start_date} must come before end_date {self.end_date}")
        return self


def _iso_date(key: str, text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key} {text!r} is not a date as YYYY-MM-DD") from None


SEASONS = ("summer", "autumn", "winter", "spring")
"""Appearances the synthetic world can be rendered in; ``summer`` is the map's own."""


class QueryParams(_Section):
    """One query domain: imagery of the map's place from which target photos are cut instead of the map."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="Domain name (lower case, digits, _).")
    source: Literal["synthetic", "file", "earthengine"] = Field(
        "synthetic", description="synthetic: the world in another season; file: a raster; earthengine: other dates."
    )
    season: Literal["summer", "autumn", "winter", "spring"] = Field(
        "autumn", description="source: synthetic -> season and time of day of the second rendering."
    )
    path: str | None = Field(None, description="source: file -> a raster of the same place (any CRS, any bounds).")
    start_date: str | None = Field(None, description="source: earthengine -> YYYY-MM-DD (the map's dates if null).")
    end_date: str | None = Field(None, description="source: earthengine -> YYYY-MM-DD.")

    @model_validator(mode="after")
    def _check(self) -> QueryParams:
        if self.source == "file" and not self.path:
            raise ValueError(f"query {self.name}: source: file needs path, the raster to read")
        if self.source == "earthengine":
            if (self.start_date is None) != (self.end_date is None):
                raise ValueError(f"query {self.name}: give both start_date and end_date, or neither")
            dates = (self.start_date, self.end_date)
            if dates[0] and dates[1] and _iso_date("start_date", dates[0]) >= _iso_date("end_date", dates[1]):
                raise ValueError(f"query {self.name}: start_date must come before end_date")
        return self


class FetchParams(_Section):
    source: Literal["synthetic", "file", "earthengine"] = "synthetic"
    size: int = Field(2048, ge=64, le=16384, description="Synthetic world side, pixels.")
    metres_per_pixel: float = Field(1.0, gt=0, le=1000, description="Synthetic ground sample distance.")
    center_lat: float = Field(46.52, ge=-80, le=84, description="Synthetic world centre latitude (UTM range).")
    center_lon: float = Field(6.63, ge=-180, le=180, description="Synthetic world centre longitude.")
    path: str | None = Field(None, description="Image to read when source is file (GeoTIFF, JPEG, PNG).")
    resample: float = Field(1.0, gt=0, le=8, description="Scale factor applied when reading a file (0.5 halves).")
    earthengine: EarthEngineParams = EarthEngineParams()
    queries: list[QueryParams] = Field(
        default_factory=lambda: [QueryParams(name="autumn", source="synthetic", season="autumn")],
        description="Query domains: the same place from other imagery; target photos are cut from each.",
    )

    @model_validator(mode="after")
    def _check(self) -> FetchParams:
        if self.source == "file" and not self.path:
            raise ValueError("source: file needs fetch.path, the image to read")
        names = [q.name for q in self.queries]
        if "same" in names or len(set(names)) != len(names):
            raise ValueError("queries: names must be unique and not 'same' (the map itself)")
        return self

    @property
    def active_queries(self) -> list[QueryParams]:
        """The query domains this map source can have: ``synthetic`` ones re-render the synthetic
        world, so with another ``source`` they are skipped (fetch says so and records it)."""
        return [q for q in self.queries if q.source != "synthetic" or self.source == "synthetic"]


class TileParams(_Section):
    n_targets: int = Field(500, ge=2, le=100_000, description="Target crops to sample.")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Share of targets held out for test.")
    mode: Literal["spatial", "random"] = "spatial"
    block_size: int = Field(512, ge=16, description="Side of the spatial split blocks, pixels.")
    view_size: int = Field(224, ge=8, le=1024, description="Side of a view / target crop, pixels.")
    write_crops: bool = Field(True, description="Write each target crop as a PNG.")
    min_texture: float = Field(
        2.0, ge=0, le=255, description="Skip candidate targets whose texture (mean grey gradient) is below this."
    )

    @model_validator(mode="after")
    def _check(self) -> TileParams:
        if self.mode == "spatial" and self.block_size <= self.view_size:
            raise ValueError("block_size must be larger than view_size so whole views fit inside a block")
        return self


class EnvParams(_Section):
    """Dynamics and the original design's reward; the stop threshold comes from the encode stage."""

    action_step: float = Field(0.05, gt=0, le=1, description="Largest move per step, fraction of the map side.")
    bonus_band: float = Field(
        0.08, gt=0, le=2, description="Similarity band below the calibrated stop threshold where the bonus ramps up."
    )
    bonus_scale: float = Field(10.0, ge=0, le=1e6, description="Bonus at similarity 1.")
    success_bonus: float = Field(100.0, ge=0, le=1e6, description="Reward when the own stop rule fires.")
    step_penalty: float = Field(0.01, ge=0, le=1e6)
    max_nodata: float = Field(
        0.5, ge=0, lt=1, description="Largest share of a view without imagery that a move may enter."
    )
    actions: Literal["continuous", "discrete", "candidates"] = Field(
        "continuous",
        description="continuous: Box(2); discrete: 8 compass moves; candidates: fly to a candidate, refine, move on.",
    )
    stop_action: bool = Field(
        False, description="Add a STOP action: the episode ends when the agent stops, a success only inside the radius."
    )
    stop_penalty: float = Field(
        10.0, ge=0, le=1e6, description="stop_action: reward lost by stopping outside the success radius (training)."
    )
    stop_at_best: bool = Field(
        True,
        description="candidates with stop_action: STOP is refused where a visited candidate matched the photo better "
        "(the agent flies back there instead), and 'move on' at the best candidate with all visited ends the search "
        "there; ignored by the other action spaces.",
    )


class EncoderParams(_Section):
    kind: Literal["pooled", "mobilenet_v2", "nature_cnn", "impala_cnn"] = Field(
        "impala_cnn", description="Feature space for similarity, retrieval and policy inputs."
    )
    weights: Literal["imagenet", "ssl", "random"] = Field("ssl", description="Encoder initialisation.")
    weights_path: str | None = Field(
        None, description="weights: imagenet -> a local MobileNetV2 state dict (.pth) instead of the torch hub cache."
    )
    input_size: int = Field(112, ge=16, le=448, description="Encoder input side, pixels (views are resized).")
    cache_stride: int = Field(16, ge=2, le=256, description="Grid spacing of the dense feature cache, pixels.")
    cache_shifts: int = Field(
        0, ge=0, le=16, description="Shifted encoder passes per axis for the cache (0: enough to reach cache_stride)."
    )
    border: int | None = Field(
        None, ge=0, le=16, description="Feature cells dropped at each view edge before pooling (None: per kind)."
    )
    pool_grid: int = Field(2, ge=1, le=4, description="Pool features over pool_grid x pool_grid boxes (1: global).")
    whiten: bool = Field(True, description="PCA-whiten embeddings with statistics of the map's own views.")
    out_dim: int = Field(256, ge=0, le=8192, description="Whitened dimensions kept (0: all).")
    ssl_steps: int = Field(150, ge=0, le=100_000, description="Contrastive pretraining steps (weights: ssl).")
    ssl_batch_size: int = Field(32, ge=4, le=1024, description="Places per contrastive step (two views each).")
    ssl_lr: float = Field(1e-3, gt=0, le=1)
    ssl_temperature: float = Field(0.2, gt=0, le=10, description="InfoNCE softmax temperature.")
    stop_quantile: float = Field(
        0.9999, gt=0.5, le=1, description="Quantile of far-view similarity the stop threshold must clear."
    )
    stop_margin: float = Field(0.02, ge=0, le=1, description="Added to that quantile to give the stop threshold.")
    local_norm: float = Field(
        0.125,
        ge=0,
        le=1,
        description="Local standardisation of the input, Gaussian sigma as a share of input_size (0: off).",
    )
    augment: Literal["mild", "degrade", "strong"] = Field(
        "mild",
        description="SSL views: mild (small jitter) | degrade (+ blur, noise, JPEG, haze or cloud) | "
        "strong (any rotation, scale 0.5-2, strong colour changes).",
    )
    heading_search: int = Field(
        8, ge=1, le=36, description="Headings a query photo is tried at; the best retrieval match wins (1: off)."
    )
    cross_domain: float = Field(
        0.9, ge=0, le=1, description="Share of SSL pairs whose second view comes from a query domain (train area only)."
    )
    torch_threads: int = Field(2, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> EncoderParams:
        if self.weights == "imagenet" and self.kind != "mobilenet_v2":
            raise ValueError("weights: imagenet exists only for kind: mobilenet_v2; use ssl or random")
        return self


class AgentParams(_Section):
    memory: Literal["retrieval", "none"] = Field("retrieval", description="Map memory fed to the policy.")
    retriever: Literal["encoder", "orientation"] = Field(
        "encoder",
        description="Where the retrieval candidates come from: the encoder's map memory, or orientation "
        "correlation of the photo's pixels over the whole map (no training; for photos of another date).",
    )
    n_candidates: int = Field(3, ge=1, le=64, description="Retrieval candidates in the observation.")
    include_position: bool = True
    include_prev_action: bool = True
    nav: bool = Field(
        True, description="Give the policy the nav vector; false: the two views only (the original design)."
    )
    sim_history: int = Field(0, ge=0, le=64, description="Own similarities of the last N steps in the nav vector.")
    candidate_view_sim: bool = Field(
        False, description="Per candidate, the similarity of the current view to the map's view there."
    )
    candidate_seen_sim: bool = Field(
        False, description="Per candidate, the best own similarity seen there this episode (-1 before a visit)."
    )
    portable: bool = Field(
        False,
        description="The nav vector only, similarities relative to the stop threshold: transfers to other maps.",
    )


Algo = Literal["ppo", "a2c", "reinforce", "recurrent_ppo", "sac", "td3", "dqn", "qrdqn"]
ALGOS: tuple[str, ...] = get_args(Algo)
"""Every ``train.algo``. ``reinforce`` is A2C run as REINFORCE with a learned baseline (Monte Carlo
returns, see :func:`maprl.learn.training.algo_kwargs`), so it saves and loads as an A2C model."""


class TrainParams(_Section):
    hparams: Literal["tuned", "params"] = Field(
        "tuned", description="tuned: best trial of the tune stage (models/best_hparams.yaml); params: the values below."
    )
    algo: Algo = Field(
        "ppo",
        description="ppo | a2c | reinforce (A2C with Monte Carlo returns) | recurrent_ppo | sac, td3 (env.actions: "
        "continuous) | dqn, qrdqn (discrete or candidates actions).",
    )
    buffer_size: int = Field(
        100_000, ge=64, le=100_000_000, description="Replay buffer of the off-policy algos (sac, td3, dqn, qrdqn)."
    )
    worlds: int = Field(
        1, ge=1, le=256, description="Train across this many procedural worlds (portable agents: the search agent)."
    )
    init_from: str | None = Field(
        None, description="A trained policy.zip to fine-tune (with this run's budget) instead of starting fresh."
    )
    total_timesteps: int = Field(300_000, ge=64, le=1_000_000_000)
    imitate: int = Field(
        0, ge=0, le=100_000_000, description="Timesteps of cloning the scripted search before RL (candidates + STOP)."
    )
    imitate_rounds: int = Field(
        1,
        ge=1,
        le=64,
        description="1: clone the scripted search's own rollouts; more: DAgger rounds (later rounds label the "
        "states the cloned policy reaches).",
    )
    n_envs: int = Field(32, ge=1, le=4096)
    max_steps: int = Field(100, ge=1, le=100_000, description="Episode step budget while training.")
    shaping: float = Field(
        1.0,
        ge=0,
        le=1e6,
        description="Potential-based distance shaping weight, gamma*phi(s') - phi(s) (0 = seed reward).",
    )
    decoy_rate: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of training episodes whose top retrieval candidate is a decoy.",
    )
    curriculum: int = Field(
        0,
        ge=0,
        le=16,
        description="Curriculum levels (0: off): decoy rate and photo perturbation start at 0 and rise a level each "
        "time a rollout's training success reaches train.curriculum_success.",
    )
    curriculum_success: float = Field(
        0.8, gt=0, le=1, description="Training success rate over one rollout that moves the curriculum up a level."
    )
    randomize: float = Field(
        0.5, ge=0, le=1, description="The randomized agent: largest perturbation strength of its training photos."
    )
    randomize_views: int = Field(
        2, ge=1, le=64, description="The randomized agent: randomized photos prepared per training target."
    )
    learning_rate: float = Field(3e-4, gt=0, le=1)
    lr_schedule: Literal["linear", "constant"] = "linear"
    n_steps: int = Field(128, ge=8, le=1_000_000)
    batch_size: int = Field(512, ge=8, le=1_000_000)
    n_epochs: int = Field(5, ge=1, le=100)
    gamma: float = Field(0.98, gt=0, lt=1)
    gae_lambda: float = Field(0.95, gt=0, le=1)
    clip_range: float = Field(0.2, gt=0, le=1)
    ent_coef: float = Field(0.0, ge=0, le=1)
    vf_coef: float = Field(0.5, ge=0, le=10)
    max_grad_norm: float = Field(0.5, gt=0, le=100)
    eval_freq: int = Field(50_000, ge=1, description="Timesteps between periodic evaluations.")
    eval_episodes: int = Field(64, ge=1, description="Episodes per periodic evaluation and split.")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="Share of train targets held out for validation.")
    checkpoint_freq: int = Field(50_000, ge=1, description="Timesteps between checkpoints.")
    resume: bool = Field(True, description="Continue from the last checkpoint after a killed run.")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (pip install maprl[tensorboard]).")
    torch_threads: int = Field(1, ge=1, le=256)
    workers: int = Field(
        2, ge=1, le=64, description="Processes the train stage's agents train in (the results do not depend on it)."
    )
    progress_bar: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        if self.batch_size > self.n_steps * self.n_envs:
            raise ValueError("batch_size must be <= n_steps * n_envs (one rollout)")
        if self.imitate and self.algo != "ppo":
            raise ValueError(
                f"imitate (the warm start, on for the search agent) clones the scripted search into PPO, not "
                f"{self.algo}: set algo: ppo, or train another agent alone with it (maprl train --agent memory "
                "--params FILE)"
            )
        return self


class TuneParams(_Section):
    """Optuna study over PPO hyperparameters (owned by maprl/tuning.py; see README "Tuning").

    ``space`` maps a hyperparameter to ``{low, high, log, step}`` or ``{choices: [...]}``. Names are the
    ``train`` keys learning_rate, n_steps, batch_size, n_epochs, gamma, gae_lambda, clip_range, ent_coef,
    vf_coef and max_grad_norm, or ``one_minus_gamma`` (x is sampled, gamma = 1 - x; use ``log: true``).
    ``n_steps`` and ``batch_size`` take powers of two: ``choices``, or ``low``/``high`` sampled on the
    exponent. Keys left out of ``space`` keep their ``train`` value. Sampler and trials seed from ``base.seed``.
    """

    n_trials: int = Field(
        4, ge=1, le=100_000, description="Finished (complete + pruned) trials wanted in the study, across workers."
    )
    timesteps: int = Field(30_000, ge=1, description="PPO timesteps per trial.")
    n_envs: int | None = Field(
        None, ge=1, le=4096, description="Envs per trial (null: train.n_envs, so n_steps and batch_size transfer)."
    )
    sampler: Literal["anneal", "tpe", "random", "cmaes"] = Field(
        "anneal", description="anneal: seeded simulated annealing; tpe, random, cmaes: Optuna's samplers."
    )
    objective: Literal["success_rate", "spl"] = Field("spl", description="Validation metric the study maximises.")
    eval_episodes: int = Field(32, ge=1, le=100_000, description="Validation episodes per report.")
    n_evaluations: int = Field(
        3, ge=1, le=1000, description="Reports per trial, evenly spaced; the last (after training) is its value."
    )
    pruner_startup_trials: int = Field(2, ge=0, description="MedianPruner: finished trials before any pruning.")
    pruner_warmup_steps: int = Field(1, ge=0, description="MedianPruner: first reports of a trial never pruned.")
    storage: str = Field(
        "data/tune/study.journal",
        min_length=1,
        description="Journal file (one machine), postgresql://user:pw@host/db (several machines) or sqlite:///f.db.",
    )
    study_name: str = Field("maprl", min_length=1, description="Study name in the storage; workers join it by name.")
    heartbeat_interval: int = Field(
        60, ge=1, description="Seconds between heartbeats of a running trial (database storage only)."
    )
    grace_period: int = Field(
        180, ge=2, description="Seconds without a heartbeat before a trial counts as dead (database storage only)."
    )
    max_retry: int = Field(2, ge=0, le=100, description="Re-runs of a trial whose worker died.")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: TuneParams.default_space(),
        description="Search space: name -> {low, high, log, step} or {choices: [...]} (README 'Tuning').",
    )

    @staticmethod
    def default_space() -> dict[str, dict[str, Any]]:
        """The search space used when params.yaml gives none (rl-zoo-like ranges for PPO)."""
        return {
            "learning_rate": {"low": 1e-4, "high": 3e-3, "log": True},
            "n_steps": {"choices": [64, 128, 256]},
            "batch_size": {"choices": [256, 512, 1024]},
            "n_epochs": {"low": 3, "high": 10},
            "one_minus_gamma": {"low": 0.005, "high": 0.1, "log": True},
            "gae_lambda": {"low": 0.9, "high": 0.99},
            "ent_coef": {"low": 1e-8, "high": 1e-2, "log": True},
            "clip_range": {"low": 0.1, "high": 0.3},
        }

    @model_validator(mode="before")
    @classmethod
    def _normalise_space(cls, data: Any) -> Any:
        if isinstance(data, dict) and "space" in data:
            data = {**data, "space": cls.check_space(data["space"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> TuneParams:
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period ({self.grace_period}) must be larger than heartbeat_interval ({self.heartbeat_interval})"
            )
        scheme = self.storage.split("://")[0].split("+")[0] if "://" in self.storage else None
        if scheme is not None and scheme not in ("postgresql", "sqlite", "mysql"):
            raise ValueError(
                f"storage: unsupported URL scheme {scheme!r}; use a journal file path, "
                "postgresql://user:password@host/db or sqlite:///file.db"
            )
        return self

    @classmethod
    def check_space(cls, space: Any) -> dict[str, dict[str, Any]]:
        """Validate and normalise a search space; ``ValueError`` names the bad key."""
        names = {*HPARAM_KEYS, "one_minus_gamma"}
        if not isinstance(space, dict) or not space:
            raise ValueError("space must be a non-empty mapping: hyperparameter -> {low, high, log} or {choices}")
        unknown = sorted(str(k) for k in set(space) - names)
        if unknown:
            raise ValueError(
                f"space: unknown hyperparameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
            )
        if "gamma" in space and "one_minus_gamma" in space:
            raise ValueError("space: give gamma or one_minus_gamma, not both")
        return {name: cls._check_spec(name, spec) for name, spec in space.items()}

    @classmethod
    def _check_spec(cls, name: str, spec: Any) -> dict[str, Any]:
        where = f"space.{name}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where} must be a mapping: {{low, high, log}} or {{choices: [...]}} (got {spec!r})")
        extra = sorted(str(k) for k in set(spec) - {"low", "high", "log", "step", "choices"})
        if extra:
            raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}; use low, high, log, step or choices")
        out = cls._check_choices(where, spec) if "choices" in spec else cls._check_range(where, spec)
        if name in INT_HPARAMS:
            out = cls._as_int(where, name, out)
        values = out["choices"] if "choices" in out else [out["low"], out["high"]]
        if name in ("n_steps", "batch_size"):
            cls._check_power_of_two(where, out, values)
        cls._check_limits(name, where, values)
        return out

    @staticmethod
    def _as_int(where: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        nums = [spec[k] for k in ("low", "high", "step") if spec.get(k) is not None] + spec.get("choices", [])
        if any(float(v) != int(v) for v in nums):
            raise ValueError(f"{where}: {name} takes integers; got {nums}")
        out = {k: v if k == "log" or v is None else int(v) for k, v in spec.items() if k != "choices"}
        return {"choices": [int(v) for v in spec["choices"]]} if "choices" in spec else out

    @staticmethod
    def _number(where: str, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{where} must be a number (got {value!r})")
        try:
            x = value if not isinstance(value, str) else float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            raise ValueError(f"{where} must be a number (got {value!r})") from None
        if x != x or x in (float("inf"), float("-inf")):
            raise ValueError(f"{where} must be finite (got {value!r})")
        return x

    @classmethod
    def _check_choices(cls, where: str, spec: dict[str, Any]) -> dict[str, Any]:
        if set(spec) != {"choices"}:
            raise ValueError(f"{where}: choices cannot be combined with low, high, log or step")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ValueError(f"{where}.choices must be a non-empty list (got {choices!r})")
        values = [cls._number(f"{where}.choices", v) for v in choices]
        if len(set(values)) != len(values):
            raise ValueError(f"{where}.choices has duplicates: {values}")
        return {"choices": values}

    @classmethod
    def _check_range(cls, where: str, spec: dict[str, Any]) -> dict[str, Any]:
        if "low" not in spec or "high" not in spec:
            raise ValueError(f"{where} needs low and high (or choices: [...])")
        low, high = cls._number(f"{where}.low", spec["low"]), cls._number(f"{where}.high", spec["high"])
        if low > high:
            raise ValueError(f"{where}: low ({low}) > high ({high})")
        log = spec.get("log", False)
        if not isinstance(log, bool):
            raise ValueError(f"{where}.log must be true or false (got {log!r})")
        step = None if spec.get("step") is None else cls._number(f"{where}.step", spec["step"])
        if log and low <= 0:
            raise ValueError(f"{where}: log: true needs low > 0 (got {low})")
        if step is not None and (step <= 0 or log):
            raise ValueError(f"{where}.step must be > 0 and cannot be combined with log: true")
        out: dict[str, Any] = {"low": low, "high": high}
        out.update({"log": True} if log else {})
        out.update({} if step is None else {"step": step})
        return out

    @staticmethod
    def _check_power_of_two(where: str, spec: dict[str, Any], values: list[Any]) -> None:
        bad = [v for v in values if int(v) < 1 or int(v) & (int(v) - 1)]
        if bad:
            what = "choices" if "choices" in spec else "low and high"
            raise ValueError(f"{where}: {what} must be powers of two (64, 128, 256, ...); not {bad}")
        if "choices" not in spec and (spec.get("log") or spec.get("step") not in (None, 1)):
            raise ValueError(f"{where}: low/high are sampled on the exponent (powers of two); drop log and step")

    @staticmethod
    def _check_limits(name: str, where: str, values: list[Any]) -> None:
        rules: dict[str, tuple[Any, str]] = {
            "learning_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "one_minus_gamma": (lambda v: 0 <= v < 1, "in [0, 1)"),
            "gae_lambda": (lambda v: 0 <= v <= 1, "in [0, 1]"),
            "clip_range": (lambda v: v > 0, "> 0"),
            "ent_coef": (lambda v: v >= 0, ">= 0"),
            "vf_coef": (lambda v: v >= 0, ">= 0"),
            "max_grad_norm": (lambda v: v > 0, "> 0"),
            "n_epochs": (lambda v: v >= 1, ">= 1"),
            "n_steps": (lambda v: v >= 2, ">= 2"),
            "batch_size": (lambda v: v >= 2, ">= 2"),
        }
        ok, text = rules[name]
        bad = [v for v in values if not ok(v)]
        if bad:
            raise ValueError(f"{where}: {name} must be {text}; got {bad}")


class EvaluateParams(_Section):
    episodes: int = Field(200, ge=1, description="Fixed episodes per split.")
    max_steps: int = Field(100, ge=1, description="Step budget per episode.")
    success_radius: float = Field(56.0, gt=0, description="Ground-truth success radius, pixels.")
    distance_bins: list[float] = Field([250, 500, 1000], description="Start-distance bin edges, pixels.")
    texture_bins: list[float] = Field(
        [2, 5, 10, 15, 20], description="Texture (mean grey gradient) bin edges for results by texture."
    )
    gif_steps: int = Field(60, ge=1)
    saliency_steps: int = Field(
        8, ge=0, le=200, description="Frames of data/eval/saliency.gif (memory agent, first test episode); 0: none."
    )
    saliency_stride: int = Field(
        28, ge=1, description="Pixels between the blurred patches of that video's saliency (coarse: cheap)."
    )
    decoy_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Decoy stress test (split test_decoy): share of episodes with a decoy; 0 skips.",
    )
    workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Processes the episodes and calibration answers run in (results do not depend on it).",
    )


PERTURBATIONS = (
    "brightness", "contrast", "gamma", "colour_cast", "saturation", "grayscale", "haze", "blur",
    "noise", "jpeg", "cloud", "rotation", "scale", "tilt",
)  # fmt: skip
"""Query perturbation kinds (:mod:`maprl.data.perturb`)."""


class RobustnessParams(_Section):
    """The ``robustness`` stage: methods under perturbed queries, query domains and perturbed dynamics."""

    kinds: list[Literal[PERTURBATIONS]] = Field(  # type: ignore[valid-type]
        list(PERTURBATIONS), description="Perturbations to sweep."
    )
    strengths: list[float] = Field([0.5, 1.0], description="Strengths in (0, 1] (0.5 is 'moderate', 0.25 mild).")
    episodes: int = Field(50, ge=1, le=100_000, description="Fixed test episodes per cell.")
    action_scales: list[float] = Field([0.5, 0.75, 1.25, 1.5], description="Dynamics sweep: action scale factors.")
    action_noise: list[float] = Field([0.1, 0.3, 0.5], description="Dynamics sweep: Gaussian action noise sigmas.")
    oracle: bool = Field(True, description="Include the template-matching oracle (the slowest method).")
    workers: int = Field(2, ge=1, le=64, description="Processes the cells run in (the results do not depend on it).")

    @model_validator(mode="after")
    def _check(self) -> RobustnessParams:
        if not self.strengths or not all(0 < s <= 1 for s in self.strengths):
            raise ValueError("strengths must be a non-empty list of numbers in (0, 1]")
        if not all(0 < a <= 4 for a in self.action_scales) or not all(0 <= s <= 4 for s in self.action_noise):
            raise ValueError("action_scales must lie in (0, 4] and action_noise in [0, 4]")
        return self


class GridSetting(_Section):
    """One grid of the ``grid`` stage: ``size`` x ``size`` patches of ``patch`` pixels, ``budget`` moves,
    start-goal distances ``c_min..c_max`` (Manhattan, in cells)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$", description="Setting name (lower case, digits, _).")
    size: int = Field(5, ge=2, le=64, description="Grid side, cells.")
    patch: int = Field(64, ge=8, le=1024, description="Patch side, map pixels (a grid image is size * patch).")
    budget: int = Field(10, ge=1, le=64, description="Moves per episode.")
    c_min: int = Field(4, ge=1, le=126, description="Smallest start-goal Manhattan distance, cells.")
    c_max: int = Field(8, ge=1, le=126, description="Largest start-goal Manhattan distance, cells.")

    @model_validator(mode="after")
    def _check(self) -> GridSetting:
        if not self.c_min <= self.c_max <= 2 * (self.size - 1):
            raise ValueError(
                f"setting {self.name}: need c_min <= c_max <= 2 * (size - 1) = {2 * (self.size - 1)}; "
                f"got {self.c_min}..{self.c_max}"
            )
        return self


def _default_grid_settings() -> list[GridSetting]:
    return [
        GridSetting(name="published", size=5, patch=64, budget=10, c_min=4, c_max=8),
        GridSetting(name="hard", size=15, patch=32, budget=10, c_min=6, c_max=10),
    ]


class GridParams(_Section):
    """The ``grid`` stage: the published active geo-localization protocol (a grid of patches, 4 moves)."""

    settings: list[GridSetting] = Field(
        default_factory=_default_grid_settings,
        description="Grids to run: published (5x5, budget 10, C 4..8, as AiRLoc, GOMAA-Geo, GeoExplorer) and hard.",
    )
    pairs: int = Field(5, ge=1, le=1000, description="Test episodes per image and distance (start-goal pairs).")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="Share of the grid images held out for test.")
    seeds: int = Field(3, ge=1, le=64, description="Training seeds of the agent (base.seed + 0..seeds-1).")
    timesteps: int = Field(40_000, ge=64, le=100_000_000, description="PPO timesteps per seed and setting.")
    warm_start: Literal["none", "blind_route"] = Field(
        "blind_route",
        description="blind_route: clone the best image-blind route before PPO (the agent starts from that baseline).",
    )
    imitate: int = Field(
        20_000, ge=0, le=100_000_000, description="warm_start: agent-steps of the blind route's rollouts cloned."
    )
    imitate_epochs: int = Field(20, ge=1, le=1000, description="warm_start: passes over the cloned steps.")
    n_envs: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    n_steps: int = Field(64, ge=8, le=1_000_000)
    batch_size: int = Field(256, ge=8, le=1_000_000)
    n_epochs: int = Field(4, ge=1, le=100)
    gamma: float = Field(0.95, gt=0, lt=1)
    gae_lambda: float = Field(0.95, gt=0, le=1)
    ent_coef: float = Field(0.01, ge=0, le=1)
    step_cost: float = Field(0.01, ge=0, le=1e6, description="Reward lost per move.")
    shaping: float = Field(1.0, ge=0, le=1e6, description="Potential-based shaping from the true distance (0: off).")
    saw_max_states: int = Field(
        2_000_000, ge=1, description="Self-avoiding walk: exact while this many walks are alive at most, else MC."
    )
    saw_rollouts: int = Field(10_000, ge=1, le=10_000_000, description="Self-avoiding walk MC: walks per start cell.")
    blind_max_nodes: int = Field(
        2_000_000, ge=1, description="Blind route: exhaustive while this many partial routes, else a beam this wide."
    )
    bootstrap_reps: int = Field(2000, ge=100, le=1_000_000, description="Bootstrap resamples of the agent's intervals.")
    torch_threads: int = Field(1, ge=1, le=256)
    workers: int = Field(2, ge=1, le=64, description="Processes the seeds train in (the results do not depend on it).")

    @model_validator(mode="after")
    def _check(self) -> GridParams:
        names = [s.name for s in self.settings]
        if not names or len(set(names)) != len(names):
            raise ValueError("settings must be a non-empty list with unique names")
        if self.batch_size > self.n_steps * self.n_envs:
            raise ValueError("batch_size must be <= n_steps * n_envs (one rollout)")
        return self


LOCATE_INPUTS = {
    "params": "params.yaml",
    "map": "data/map/map.tif",
    "features": "data/features",
    "policy": "models/memory/policy.zip",
    "calibration": "data/eval/calibration.json",
}
"""Where ``dvc.yaml`` has the pipeline put what ``maprl locate`` loads (relative to the repository root)."""

LOCATE_METHODS = ("agent", "retrieve_then_fly")
"""What flies the view in ``maprl locate``: the trained memory agent, or the no-learning baseline."""


class LocateParams(_Section):
    """``maprl locate`` and its confidence, calibrated by the ``evaluate`` stage."""

    method: Literal["agent", "retrieve_then_fly"] = Field(
        "agent", description="What flies the view: the trained memory agent or the no-learning retrieve-then-fly."
    )
    restarts: int = Field(
        4, ge=1, le=16, description="Flights per photo from spread starts; their agreement feeds the confidence."
    )
    top_k: int = Field(3, ge=1, le=20, description="Alternative places reported (retrieval candidates).")
    abstain_below: float = Field(
        0.5, ge=0, le=1, description="A calibrated confidence below this is reported as not located (abstain)."
    )
    gsd_scales: list[float] = Field(
        [0.5, 0.71, 1.0, 1.41, 2.0], description="--gsd auto: photo scales tried, as multiples of the map's GSD."
    )
    calibration_strength: float = Field(
        1.0, gt=0, le=1, description="Largest perturbation strength of the calibration and test queries."
    )
    reliability_bins: int = Field(10, ge=2, le=50, description="Bins of the reliability diagram and the ECE.")

    @model_validator(mode="after")
    def _check(self) -> LocateParams:
        if not self.gsd_scales or not all(0.05 <= s <= 20 for s in self.gsd_scales):
            raise ValueError("gsd_scales must be a non-empty list of scales in [0.05, 20]")
        return self


class Params(_Section):
    base: BaseParams = BaseParams()
    fetch: FetchParams = FetchParams()
    tile: TileParams = TileParams()
    env: EnvParams = EnvParams()
    encoder: EncoderParams = EncoderParams()
    agent: AgentParams = AgentParams()
    train: TrainParams = TrainParams()
    tune: TuneParams = TuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    robustness: RobustnessParams = RobustnessParams()
    locate: LocateParams = LocateParams()
    grid: GridParams = GridParams()

    @model_validator(mode="after")
    def _check(self) -> Params:
        if self.env.actions == "candidates" and self.agent.memory != "retrieval":
            raise ValueError("env.actions: candidates needs agent.memory: retrieval (the candidates come from it)")
        if self.agent.portable and not self.agent.nav:
            raise ValueError("agent.portable: true needs agent.nav: true (a portable policy sees the nav vector only)")
        return self


AGENTS = ("memory", "randomized", "nomemory", "original", "search")
"""The trained agents: ``memory`` as configured but trained on unperturbed target photos;
``randomized``, the same trained on photos perturbed up to ``train.randomize`` (domain
randomization); ``nomemory`` without the map memory (an ablation); ``original``, the original
design: the two views only, the seed reward, no shaping; ``search``, the searcher of
:data:`SEARCH_AGENT` (candidate actions with an explicit STOP, trained on randomized photos and
decoys)."""

AGENT_SLOT = "{agent}"
"""In the train stage's paths, the name of the agent that writes there."""

SEARCH_AGENT: dict[str, dict[str, Any]] = {
    "env": {"actions": "candidates", "stop_action": True},
    "agent": {
        "n_candidates": 3,
        "sim_history": 4,
        "candidate_view_sim": True,
        "candidate_seen_sim": True,
        "portable": True,
    },
    "train": {"decoy_rate": 0.1},
}
"""What the ``search`` agent changes from params.yaml: it picks among 3 retrieval candidates (fly to one,
refine, move on, STOP), sees its recent similarities, how its view compares with each candidate's
and the best match it has seen at each candidate (the nav vector only, similarities relative to
the stop threshold: portable to other maps), and trains with decoys in a tenth of its episodes
(measured against 0, 0.02, 0.05, 0.25 and 0.5: with more decoys it learns to distrust a right
top candidate that looks unlike the photo, README "An agent that searches and stops"), on photos
randomized as the ``randomized`` agent's, after a warm start that clones the scripted search
(:mod:`maprl.learn.imitation`)."""
SEARCH_IMITATE_SHARE = 0.2
"""The ``search`` agent clones the scripted search for this share of ``train.total_timesteps`` (unless
``train.imitate`` is set) before PPO."""


def agent_variant(params: Params, agent: str) -> Params:
    """``params`` as agent ``agent`` (one of :data:`AGENTS`) is trained and evaluated, validated again
    (a ParamsError names the key that does not fit the variant, e.g. ``train.algo`` for ``search``)."""
    return parse_params(_variant(params, agent).model_dump(), f"params.yaml as the {agent} agent trains")


def _variant(params: Params, agent: str) -> Params:
    if agent not in AGENTS:
        raise ParamsError(f"--agent must be one of {', '.join(AGENTS)}, got {agent!r}")
    if agent != "search" and not params.agent.portable:  # map-specific by design: its encoder is this map's
        params = params.model_copy(update={"train": params.train.model_copy(update={"worlds": 1})})
    if agent == "randomized":
        return params
    if agent == "memory":
        return params.model_copy(update={"train": params.train.model_copy(update={"randomize": 0.0})})
    if agent == "search":
        sections = {k: getattr(params, k).model_copy(update=v) for k, v in SEARCH_AGENT.items()}
        imitate = params.train.imitate or int(SEARCH_IMITATE_SHARE * params.train.total_timesteps)
        sections["train"] = sections["train"].model_copy(update={"imitate": imitate})
        return params.model_copy(update=sections)
    a = params.agent.model_copy(update={"memory": "none", "portable": False})
    env = params.env
    if env.actions == "candidates":  # no memory, no candidates: the ablation moves as the default does
        env = env.model_copy(update={"actions": "continuous"})
    update: dict[str, Any] = {"agent": a, "env": env, "train": params.train.model_copy(update={"randomize": 0.0})}
    if agent == "original":
        update["agent"] = a.model_copy(update={"nav": False})
        update["env"] = env.model_copy(update={"actions": "continuous", "stop_action": False})
        update["train"] = params.train.model_copy(update={"shaping": 0.0, "decoy_rate": 0.0, "randomize": 0.0})
    return params.model_copy(update=update)


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against the README's params table"
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "fetch": ("base", "fetch", "tile"),
    "tile": ("base", "tile"),
    "encode": ("base", "tile", "encoder", "evaluate"),
    "tune": ("base", "tile", "env", "agent", "train", "tune", "evaluate"),
    "train": ("base", "tile", "env", "agent", "train", "evaluate"),
    "evaluate": ("base", "tile", "env", "agent", "train", "evaluate", "locate"),
    "robustness": ("base", "tile", "env", "agent", "train", "evaluate", "robustness"),
    "grid": ("base", "grid"),
}
"""The params.yaml sections each stage reads; running a stage without one of them is an error."""


def parse_params(raw: Any, source: str = "params", require: tuple[str, ...] = ()) -> Params:
    """Validate an already-loaded mapping; every section in ``require`` must be present."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    missing = [name for name in require if name not in raw]
    if missing:
        raise ParamsError(
            f"{source} has no {', '.join(missing)} section(s), which this stage reads; "
            "restore them (`git checkout params.yaml`, or see the README's params table)"
        )
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load_params(path: str | Path = "params.yaml", stage: str | None = None) -> Params:
    """Read and validate ``params.yaml``; raise :class:`ParamsError` naming the bad key.

    With ``stage``, the sections that stage reads (:data:`STAGE_SECTIONS`) must be in the file.
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} does not exist; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from None
    return parse_params(raw, str(path), STAGE_SECTIONS[stage] if stage else ())


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return " \\| ".join(str(a) for a in get_args(ann))
    name = getattr(ann, "__name__", None) if get_origin(ann) is None else None
    return name or str(ann).replace("typing.", "").replace("|", "\\|")


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, key)
            continue
        default = field.get_default(call_default_factory=True)
        rows.append(f"| `{key}` | `{default!r}` | {_type_name(ann)} | {field.description or ''} |")
    return rows


def params_table() -> str:
    """The README's params table, generated from the models (a test keeps them in sync)."""
    return "\n".join(["| key | default | type | meaning |", "|---|---|---|---|", *_rows(Params, "")])
