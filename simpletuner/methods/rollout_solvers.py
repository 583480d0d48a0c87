"""The ODE solvers that carry scheduled sampling's rollouts down their noise levels, every row of a
batch along its own path: Euler, classic fourth-order Runge-Kutta, DPM-Solver++ and UniPC.

Why not diffusers' schedulers: their ``step()`` keeps one position (and one multistep history) for the
whole batch, while a rollout batch holds rows that start at different levels, take different numbers
of steps and finish at different times. The arithmetic below is that of diffusers'
``EulerDiscreteScheduler`` / ``FlowMatchEulerDiscreteScheduler`` (Euler), ``DPMSolverMultistepScheduler``
(``dpmsolver++``, midpoint form) and ``UniPCMultistepScheduler`` (data prediction, ``bh2``) with their
default settings, written per row; the tests step those classes over one row's path and compare.

Shared shape of every solver here:

* ``paths`` (float64, CPU, ``(batch, columns)``) holds each row's noise levels from noisiest to the
  training level, padded at the end with that final level (see ``rollout_paths``). Column ``j`` moves a
  row only while ``paths[:, j + 1] < paths[:, j]``; a row that has arrived (or never left) is kept
  bit for bit.
* ``evaluate(sample, timesteps)`` is one batched model call for all rows. Rows that have stopped are
  evaluated too (one call serves the batch) and their outputs are ignored.
* Step coefficients are scalars per row, computed in float64 on the CPU (some accelerators have no
  float64); the tensors are updated in float32.

Noise levels (:class:`FlowLevels`, :class:`DdpmLevels`). The multistep solvers work with
``alpha_t``, ``sigma_t`` and ``lambda = log(alpha_t / sigma_t)`` of ``x_t = alpha_t x0 + sigma_t eps``:
for flow matching ``alpha = 1 - sigma``; for DDPM ``alpha = sqrt(alpha_bar)``, ``sigma =
sqrt(1 - alpha_bar)``. RK4 integrates the probability-flow ODE in a variable in which it is smooth:
flow matching ``dx/dsigma = v``; DDPM the form EulerDiscreteScheduler uses, ``y = x / sqrt(alpha_bar)``
with ``s = sqrt((1 - alpha_bar) / alpha_bar)`` and ``dy/ds = eps``. RK4's midpoints fall between
grid entries, so the model then sees a fractional timestep (DDPM: from ``s`` by linear interpolation
over the schedule's log-sigmas, as diffusers maps sigmas to timesteps; flow: ``sigma * T``).

Order lowering (multistep). Every row starts its path at column 0, so the warm-up is the same for
all rows: step ``j`` can use at most ``j + 1`` model outputs. Near the end of each row's *own* path
the order drops as diffusers' ``lower_order_final=True`` does for a schedule of that row's length
``N``: UniPC uses ``min(order, N - j)`` at step ``j``; DPM-Solver++ takes its last step with first
order (its default ``final_sigmas_type="zero"`` always does) and, when ``N < 15``, its second-to-last
with at most second order. A single-row rollout therefore equals the diffusers scheduler stepped over
that row's levels.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

#: (model input, model timesteps per row) -> the model's raw output: one batched model call.
Evaluate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: The solvers whose ``--scheduled_sampling_order`` is the number of past model outputs they combine.
MULTISTEP_SAMPLERS = ("unipc", "dpm")
MAX_MULTISTEP_ORDER = 3
#: One-step solvers have a fixed order of accuracy; ``--scheduled_sampling_order`` may only restate it.
FIXED_ORDERS = {"euler": 1, "rk4": 4}
#: DPM-Solver++ keeps its second-to-last step at high order on schedules this long (diffusers' rule).
DPM_LOWER_ORDER_SECOND_BELOW = 15
#: A flow level of exactly 1 has alpha 0 and lambda -inf. UniPC's order conditions need finite step
#: ratios, so it treats that level as 1 - 1e-6 (as UniPCMultistepScheduler does with the top of a flow
#: schedule); DPM-Solver++'s formulas reach their limit there exactly and use the level as it is.
FLOW_TOP = 1.0 - 1e-6
#: The smallest alpha_bar used: a zero-terminal-SNR schedule ends at 0, which has no finite lambda
#: (the value diffusers' multistep schedulers substitute).
MIN_ALPHA_BAR = 2.0 ** -24


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A ``(batch,)`` column of scalars shaped to broadcast over ``like``, as float32 on its device."""
    return values.to(torch.float32).to(like.device).view(-1, *([1] * (like.dim() - 1)))


def _keep_stopped(moving: torch.Tensor, moved: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``moved`` for the rows that step, ``current`` (untouched) for the rest."""
    return torch.where(moving.to(current.device).view(-1, *([1] * (current.dim() - 1))), moved, current)


def moving_rows(paths: torch.Tensor, column: int) -> torch.Tensor:
    """Rows that take a step from ``column`` to ``column + 1``."""
    return paths[:, column + 1] < paths[:, column]


def path_steps(paths: torch.Tensor):
    """For each column until every row has arrived: (column, rows that move, their levels here and
    at the next column)."""
    for column in range(paths.shape[1] - 1):
        moving = moving_rows(paths, column)
        if not bool(moving.any()):
            return
        yield column, moving, paths[:, column], paths[:, column + 1]


def steps_per_row(paths: torch.Tensor) -> torch.Tensor:
    """How many steps each row's own path has (its length without the padding)."""
    return (paths[:, 1:] < paths[:, :-1]).sum(dim=1)


# --- Euler steps and the two kinds of noise levels -------------------------------------------------------


def euler_flow_step(sample: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
                    sigma_next: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE per sample: ``x + (sigma_next - sigma) * v``."""
    shape = (-1, *([1] * (sample.dim() - 1)))
    delta = (sigma_next - sigma).to(torch.float32).to(sample.device).view(shape)
    return (sample.float() + delta * velocity.float()).to(sample.dtype)


def euler_ddpm_step(alphas_cumprod: torch.Tensor, sample: torch.Tensor, prediction: torch.Tensor,
                    timestep: torch.Tensor, timestep_next: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """One Euler step of the probability-flow ODE per sample, in DDPM coordinates.

    The model's output gives estimates of the clean latents and the noise; the next sample is those
    re-mixed at ``timestep_next``. That is ``EulerDiscreteScheduler.step`` (whose state lives in
    ``x / sqrt(alpha_bar)``) moved back to the DDPM scale, i.e. a deterministic DDIM step.
    """
    alphas = alphas_cumprod.to(sample.device, torch.float32)
    shape = (-1, *([1] * (sample.dim() - 1)))
    a = alphas[timestep.long().to(sample.device)].view(shape)
    a_next = alphas[timestep_next.long().to(sample.device)].view(shape)
    x, out = sample.float(), prediction.float()
    if prediction_type == "epsilon":
        eps = out
        clean = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        clean = a.sqrt() * x - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * x
    elif prediction_type == "sample":
        clean = out
        eps = (x - a.sqrt() * clean) / (1 - a).sqrt()
    else:
        raise ValueError(f"scheduled sampling cannot step prediction type {prediction_type!r}")
    return (a_next.sqrt() * clean + (1 - a_next).sqrt() * eps).to(sample.dtype)


class FlowLevels:
    """Flow matching: a level is ``sigma`` in ``x = (1 - sigma) x0 + sigma eps``; the model predicts
    the velocity ``eps - x0`` at timestep ``sigma * T``."""

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = num_train_timesteps

    def model_timesteps(self, levels: torch.Tensor) -> torch.Tensor:
        return (levels * self.num_train_timesteps).to(torch.float32)

    def finite_lambda_levels(self, paths: torch.Tensor) -> torch.Tensor:
        return paths.clamp(max=FLOW_TOP)

    def alpha_sigma(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - levels, levels

    def data_prediction(self, output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
        return sample - sigma * output

    def euler_step(self, sample: torch.Tensor, output: torch.Tensor, here: torch.Tensor,
                   there: torch.Tensor) -> torch.Tensor:
        return euler_flow_step(sample, output, here, there)

    # the ODE RK4 integrates: dx/dsigma = v
    def ode_variable(self, levels: torch.Tensor) -> torch.Tensor:
        return levels

    def level_of(self, ode_variable: torch.Tensor) -> torch.Tensor:
        return ode_variable

    def ode_state(self, sample: torch.Tensor, ode_variable: torch.Tensor) -> torch.Tensor:
        return sample

    def sample_of(self, state: torch.Tensor, ode_variable: torch.Tensor) -> torch.Tensor:
        return state

    def ode_slope(self, output: torch.Tensor, sample: torch.Tensor, ode_variable: torch.Tensor) -> torch.Tensor:
        return output.float()


class DdpmLevels:
    """DDPM families: a level is a timestep of the training schedule (integers on the grid, fractional
    at RK4's midpoints); the model's output is read as its ``prediction_type`` says."""

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"scheduled sampling cannot step prediction type {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to("cpu")
        self.prediction_type = prediction_type
        alpha_bar = self.alphas_cumprod.to(torch.float64).clamp(min=MIN_ALPHA_BAR)
        #: log of the "Karras" sigma sqrt((1 - alpha_bar) / alpha_bar), rising with the timestep
        self.log_sigmas = 0.5 * (torch.log1p(-alpha_bar) - torch.log(alpha_bar))

    def model_timesteps(self, levels: torch.Tensor) -> torch.Tensor:
        """Integer timesteps as int64 (what training feeds the model), fractional ones as float32."""
        if torch.equal(levels, levels.round()):
            return levels.to(torch.int64)
        return levels.to(torch.float32)

    def finite_lambda_levels(self, paths: torch.Tensor) -> torch.Tensor:
        return paths  # alpha_bar is kept >= MIN_ALPHA_BAR already

    def karras_sigma(self, levels: torch.Tensor) -> torch.Tensor:
        """``sqrt((1 - alpha_bar) / alpha_bar)`` at (possibly fractional) timesteps: log-sigma is
        interpolated linearly between integer timesteps."""
        last = self.log_sigmas.numel() - 1
        levels = levels.to(torch.float64).clamp(0, last)
        low = levels.floor().long().clamp(max=last - 1)
        weight = levels - low
        return torch.exp(torch.lerp(self.log_sigmas[low], self.log_sigmas[low + 1], weight))

    def alpha_sigma(self, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.karras_sigma(levels)
        alpha = torch.rsqrt(1 + sigma ** 2)
        return alpha, sigma * alpha

    def data_prediction(self, output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                        sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return (sample - sigma * output) / alpha
        if self.prediction_type == "v_prediction":
            return alpha * sample - sigma * output
        return output

    def noise_prediction(self, output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor,
                         sigma: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return output
        if self.prediction_type == "v_prediction":
            return alpha * output + sigma * sample
        return (sample - alpha * output) / sigma

    def euler_step(self, sample: torch.Tensor, output: torch.Tensor, here: torch.Tensor,
                   there: torch.Tensor) -> torch.Tensor:
        return euler_ddpm_step(self.alphas_cumprod, sample, output, here, there, self.prediction_type)

    # the ODE RK4 integrates: y = x / sqrt(alpha_bar) = x0 + s * eps, dy/ds = eps
    def ode_variable(self, levels: torch.Tensor) -> torch.Tensor:
        return self.karras_sigma(levels)

    def level_of(self, ode_variable: torch.Tensor) -> torch.Tensor:
        """The fractional timestep whose sigma is ``ode_variable`` (inverse of :meth:`karras_sigma`)."""
        log_sigma = torch.log(ode_variable.to(torch.float64))
        last = self.log_sigmas.numel() - 1
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, last)
        low_value, high_value = self.log_sigmas[high - 1], self.log_sigmas[high]
        weight = ((log_sigma - low_value) / (high_value - low_value)).clamp(0, 1)
        return (high - 1).to(torch.float64) + weight

    def ode_state(self, sample: torch.Tensor, ode_variable: torch.Tensor) -> torch.Tensor:
        return sample.float() * _per_row(torch.sqrt(1 + ode_variable ** 2), sample)

    def sample_of(self, state: torch.Tensor, ode_variable: torch.Tensor) -> torch.Tensor:
        return state * _per_row(torch.rsqrt(1 + ode_variable ** 2), state)

    def ode_slope(self, output: torch.Tensor, sample: torch.Tensor, ode_variable: torch.Tensor) -> torch.Tensor:
        alpha = torch.rsqrt(1 + ode_variable ** 2)
        return self.noise_prediction(output.float(), sample.float(), _per_row(alpha, sample),
                                     _per_row(ode_variable * alpha, sample))


NoiseLevels = FlowLevels | DdpmLevels


# --- one-step solvers --------------------------------------------------------------------------------


def euler_rollout(sample: torch.Tensor, paths: torch.Tensor, evaluate: Evaluate, levels: NoiseLevels) -> torch.Tensor:
    """One model call per step; the step is diffusers' Euler step (DDIM for DDPM families)."""
    x = sample.float()
    for _, moving, here, there in path_steps(paths):
        output = evaluate(x, levels.model_timesteps(here))
        x = _keep_stopped(moving, levels.euler_step(x, output, here, there), x)
    return x


def rk4_rollout(sample: torch.Tensor, paths: torch.Tensor, evaluate: Evaluate, levels: NoiseLevels) -> torch.Tensor:
    """Classic Runge-Kutta: four model calls per step (at the start, twice at the midpoint of the ODE
    variable, at the end), combined with weights 1/6, 2/6, 2/6, 1/6."""
    x = sample.float()
    for _, moving, here, there in path_steps(paths):
        start, end = levels.ode_variable(here), levels.ode_variable(there)
        middle = (start + end) / 2
        middle_level = levels.level_of(middle)

        def slope(state: torch.Tensor, variable: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            point = levels.sample_of(state, variable)
            return levels.ode_slope(evaluate(point, levels.model_timesteps(level)), point, variable)

        step = end - start
        half = _per_row(step / 2, x)
        state = levels.ode_state(x, start)
        k1 = slope(state, start, here)
        k2 = slope(state + half * k1, middle, middle_level)
        k3 = slope(state + half * k2, middle, middle_level)
        k4 = slope(state + _per_row(step, x) * k3, end, there)
        state = state + _per_row(step / 6, x) * (k1 + 2 * k2 + 2 * k3 + k4)
        x = _keep_stopped(moving, levels.sample_of(state, end), x)
    return x


# --- multistep solvers: per-row coefficients ----------------------------------------------------------
#
# Both solvers step x_s0 -> x_t as a weighted sum  w_x * x_s0 + sum_k w_k * m_k  of the current sample
# and the data predictions m_0 (at s0), m_1 (one step earlier), ... For each row the weights are plain
# floats from its own lambdas (lambdas[0] at the target t, lambdas[1] at s0, lambdas[2] at s1, ...).


def dpm_solver_weights(lambdas: Sequence[float], alpha_t: float, sigma_t: float, sigma_s0: float,
                       order: int) -> list[float]:
    """``[w_x, w_0, ..., w_{order-1}]`` of one DPM-Solver++ step (data prediction, midpoint form for
    order 2; order 3 fits a quadratic through three outputs)."""
    h = lambdas[0] - lambdas[1]
    phi = math.expm1(-h)  # e^-h - 1
    weights = [sigma_t / sigma_s0, -alpha_t * phi]
    if order == 1:
        return weights
    r0 = (lambdas[1] - lambdas[2]) / h
    first_diff_0 = [1 / r0, -1 / r0, 0.0]  # D1_0 = (m0 - m1) / r0 as weights of m0, m1, m2
    if order == 2:
        half = -0.5 * alpha_t * phi
        return [weights[0], weights[1] + half * first_diff_0[0], half * first_diff_0[1]]
    r1 = (lambdas[2] - lambdas[3]) / h
    first_diff_1 = [0.0, 1 / r1, -1 / r1]  # D1_1 = (m1 - m2) / r1
    spread = [a - b for a, b in zip(first_diff_0, first_diff_1)]
    first = [a + r0 / (r0 + r1) * b for a, b in zip(first_diff_0, spread)]  # D1
    second = [b / (r0 + r1) for b in spread]  # D2
    c_first = alpha_t * (phi / h + 1.0)
    c_second = -alpha_t * ((phi + h) / h ** 2 - 0.5)
    data = [weights[1] + c_first * first[0] + c_second * second[0]]
    data += [c_first * first[k] + c_second * second[k] for k in (1, 2)]
    return [weights[0], *data]


def _unipc_rhs(h: float, order: int) -> tuple[float, float, list[float]]:
    """``(B(h), h*phi_1(h), b)`` of UniPC in data-prediction form with B(h) = e^-h - 1 (``bh2``):
    ``b[i]`` is the right-hand side of the order condition for power ``i`` of the step ratios."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = h_phi_1
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rhs = []
    for i in range(1, order + 1):
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, h_phi_1, rhs


def _step_ratios(lambdas: Sequence[float], count: int, h: float) -> list[float]:
    """``r_i = (lambda_{s_i} - lambda_{s_0}) / h`` for the ``count`` outputs before ``m_0``."""
    return [(lambdas[1 + i] - lambdas[1]) / h for i in range(1, count + 1)]


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(matrix, dtype=torch.float64),
                              torch.tensor(rhs, dtype=torch.float64)).tolist()


def unipc_predictor_weights(lambdas: Sequence[float], alpha_t: float, sigma_t: float, sigma_s0: float,
                            order: int) -> list[float]:
    """``[w_x, w_0, ..., w_{order-1}]`` of one UniP step (the predictor) of the given order."""
    h = lambdas[0] - lambdas[1]
    b_h, h_phi_1, rhs = _unipc_rhs(h, order)
    ratios = _step_ratios(lambdas, order - 1, h)
    if order == 1:
        rhos = []
    elif order == 2:
        rhos = [0.5]  # UniPC's simplified second-order predictor
    else:
        powers = [[r ** i for r in ratios] for i in range(order - 1)]
        rhos = _solve(powers, rhs[: order - 1])
    weights = [sigma_t / sigma_s0, -alpha_t * h_phi_1]
    for rho, ratio in zip(rhos, ratios):  # D_k = (m_k - m_0) / r_k, scaled by -alpha_t B(h) rho_k
        weights[1] += alpha_t * b_h * rho / ratio
        weights.append(-alpha_t * b_h * rho / ratio)
    return weights


def unipc_corrector_weights(lambdas: Sequence[float], alpha_t: float, sigma_t: float, sigma_s0: float,
                            order: int) -> list[float]:
    """``[w_x, w_new, w_0, ..., w_{order-1}]`` of one UniC step: the sample at t recomputed from the
    sample at s0, the model output at t (``m_new``, already computed for the next predictor step) and
    the earlier outputs. ``order`` is the order of the predictor step being corrected."""
    h = lambdas[0] - lambdas[1]
    b_h, h_phi_1, rhs = _unipc_rhs(h, order)
    ratios = _step_ratios(lambdas, order - 1, h)
    if order == 1:
        rhos = [0.5]
    else:
        powers = [[r ** i for r in [*ratios, 1.0]] for i in range(order)]
        rhos = _solve(powers, rhs)
    weights = [sigma_t / sigma_s0, -alpha_t * b_h * rhos[-1], -alpha_t * h_phi_1 + alpha_t * b_h * rhos[-1]]
    for rho, ratio in zip(rhos[:-1], ratios):
        weights[2] += alpha_t * b_h * rho / ratio
        weights.append(-alpha_t * b_h * rho / ratio)
    return weights


def _combine(weights: list[list[float]], tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per row, ``sum_i weights[row][i] * tensors[i]`` (rows with fewer weights use zeros)."""
    table = torch.zeros(len(weights), len(tensors), dtype=torch.float64)
    for row, row_weights in enumerate(weights):
        table[row, : len(row_weights)] = torch.tensor(row_weights, dtype=torch.float64)
    total = _per_row(table[:, 0], tensors[0]) * tensors[0]
    for index in range(1, len(tensors)):
        total = total + _per_row(table[:, index], tensors[index]) * tensors[index]
    return total


class _PathWeights:
    """Every row's alpha, sigma and lambda along its path as floats, and the step weights they give."""

    def __init__(self, alpha: torch.Tensor, sigma: torch.Tensor):
        self.alpha, self.sigma = alpha.tolist(), sigma.tolist()
        self.lambdas = (torch.log(alpha) - torch.log(sigma)).tolist()

    def _lambdas_back_from(self, row: int, column: int, count: int) -> list[float]:
        """Lambdas at ``column`` and the ``count`` columns before it, newest first."""
        return [self.lambdas[row][column - i] for i in range(count + 1)]

    def step(self, sampler: str, row: int, column: int, order: int) -> list[float]:
        """Weights of ``[x, m_0, m_1, ...]`` for the step from ``column`` to ``column + 1``."""
        if not order:
            return [1.0]  # no step for this row: it stays (and is kept exactly, see _keep_stopped)
        lambdas = [self.lambdas[row][column + 1], *self._lambdas_back_from(row, column, order - 1)]
        solver = dpm_solver_weights if sampler == "dpm" else unipc_predictor_weights
        return solver(lambdas, self.alpha[row][column + 1], self.sigma[row][column + 1], self.sigma[row][column], order)

    def correction(self, row: int, column: int, order: int) -> list[float]:
        """Weights of ``[x at column - 1, m_new, m_0, m_1, ...]`` for UniC at ``column``."""
        return unipc_corrector_weights(self._lambdas_back_from(row, column, order), self.alpha[row][column],
                                       self.sigma[row][column], self.sigma[row][column - 1], order)


def multistep_orders(sampler: str, order: int, steps: torch.Tensor, column: int) -> list[int]:
    """Each row's order at step ``column`` of its path (0 for rows without that step): warm-up from
    the start, lowered at the end of the row's own path as diffusers' ``lower_order_final`` does."""
    orders = []
    for total in steps.tolist():
        if column >= total:
            orders.append(0)
            continue
        this = min(order, column + 1)
        if sampler == "unipc":
            this = min(this, total - column)
        elif column == total - 1:
            this = 1
        elif column == total - 2 and total < DPM_LOWER_ORDER_SECOND_BELOW:
            this = min(this, 2)
        orders.append(this)
    return orders


def multistep_rollout(sampler: str, order: int, sample: torch.Tensor, paths: torch.Tensor, evaluate: Evaluate,
                      levels: NoiseLevels) -> torch.Tensor:
    """DPM-Solver++ (``sampler="dpm"``) or UniPC (``"unipc"``) with history ``order``: one model call
    per step. UniPC's corrector refines the sample the previous predictor step landed on, using the
    model output taken there, which the next predictor step needs anyway: no extra call. A row's last
    step is not corrected (there is no model call after it), as in diffusers."""
    if sampler not in MULTISTEP_SAMPLERS:
        raise ValueError(f"unknown multistep sampler {sampler!r}; choose one of {', '.join(MULTISTEP_SAMPLERS)}")
    steps = steps_per_row(paths)
    solver_levels = levels.finite_lambda_levels(paths) if sampler == "unipc" else paths
    alpha, sigma = levels.alpha_sigma(solver_levels)
    weights = _PathWeights(alpha, sigma)
    x = sample.float()
    history: list[torch.Tensor] = []  # data predictions at the columns passed, newest first
    previous_x, previous_orders = x, []
    for column, moving, _, _ in path_steps(paths):
        output = evaluate(x, levels.model_timesteps(solver_levels[:, column])).float()
        data = levels.data_prediction(output, x, _per_row(alpha[:, column], x), _per_row(sigma[:, column], x))
        if sampler == "unipc" and column > 0:  # rows still moving also moved last column
            corrections = [weights.correction(row, column, this) if bool(moving[row]) else [1.0]
                           for row, this in enumerate(previous_orders)]
            x = _keep_stopped(moving, _combine(corrections, [previous_x, data, *history]), x)
        history = [data, *history][:order]
        orders = multistep_orders(sampler, order, steps, column)
        steps_here = [weights.step(sampler, row, column, this) for row, this in enumerate(orders)]
        previous_x, previous_orders = x, orders
        x = _keep_stopped(moving, _combine(steps_here, [x, *history]), x)
    return x


# --- choosing a solver ---------------------------------------------------------------------------------


def solve_rollout(sampler: str, order: int, sample: torch.Tensor, paths: torch.Tensor, evaluate: Evaluate,
                  levels: NoiseLevels) -> torch.Tensor:
    """Carry ``sample`` (noised at ``paths[:, 0]``) along every row's path with ``sampler``; returns
    float32. ``order`` only matters to the multistep solvers."""
    if sampler == "euler":
        return euler_rollout(sample, paths, evaluate, levels)
    if sampler == "rk4":
        return rk4_rollout(sample, paths, evaluate, levels)
    if sampler in MULTISTEP_SAMPLERS:
        if not 1 <= order <= MAX_MULTISTEP_ORDER:
            raise ValueError(f"{sampler} supports orders 1 to {MAX_MULTISTEP_ORDER}, not {order}")
        return multistep_rollout(sampler, order, sample, paths, evaluate, levels)
    raise ValueError(f"unknown rollout sampler {sampler!r}; choose one of euler, rk4, "
                     f"{', '.join(MULTISTEP_SAMPLERS)}")
