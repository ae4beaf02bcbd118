"""Running the encoder circuit (``fhe.encoder``) on one example: the client's embedding, the plaintext
reference, the run itself on any slot backend, the errors after each layer, the slot simulation, and
the calibration of the public bootstrap bounds on training examples."""

from __future__ import annotations

import numpy as np
import torch

from cgf_bert.fhe.accounting import Counted, Refresher, StageLog
from cgf_bert.fhe.backends import SimulatedCkks, after_levels
from cgf_bert.fhe.encoder import EncoderCircuit, as_numpy
from cgf_bert.fhe.keys import merged


def embed(model, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> np.ndarray:
    """The client's part: the embedding output (T, hidden) of one unpadded example, float64."""
    bert = model.bert
    with torch.no_grad():
        e = bert.embeddings(input_ids=input_ids[None], token_type_ids=token_type_ids[None])
    return as_numpy(e[0])


def reference(model, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    """The plaintext reference: the model itself (its specs' polynomial forms), float64, one example:
    the logits and each encoder layer's output (T, hidden)."""
    m = model.to(torch.float64)
    with torch.no_grad():
        out = m(input_ids=input_ids[None], attention_mask=torch.ones_like(input_ids)[None], token_type_ids=token_type_ids[None],
                needs=("hidden",))
    return as_numpy(out["logits"][0]), [as_numpy(h[0]) for h in out["hidden"][1:]]


def reference_logits(model, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> np.ndarray:
    return reference(model, input_ids, token_type_ids)[0]


def run(circuit: EncoderCircuit, ops, boot: Refresher, emb, log: StageLog, probe=None, start=None) -> np.ndarray:
    """Encrypt ``emb`` (T, hidden), or a list of several examples' packed in one ciphertext's consecutive
    rows, run the circuit, decrypt the logits: (2,) for one example, (examples, 2) for a list (``probe``
    as ``forward``'s, on the packed rows). ``start``: ``(layer, ciphertext)`` to go on from instead, the
    ciphertext being the output of the layer before (``fhe.staged``); ``emb`` then gives only the lengths."""
    embs = emb if isinstance(emb, (list, tuple)) else [emb]
    lengths = [e.shape[0] for e in embs]
    if start is None:
        (x,) = [ops.encrypt(v) for v in circuit.lay.pack(np.concatenate(embs))]
        start = (0, boot.origin(x, "input"))
    first, x = start
    out = circuit.forward(ops, boot, x, lengths, log, probe, first)
    boot.done(out)
    logits = ops.decrypt(out).reshape(circuit.lay.rows, circuit.lay.width)
    out = logits[circuit.starts(lengths), :2]
    return out if isinstance(emb, (list, tuple)) else out[0]


def layer_errors(circuit: EncoderCircuit, ops, hidden: list[np.ndarray], into: list[dict]):
    """A ``probe`` that decrypts each layer's output (the client's key: a measurement only) and appends
    its max and mean abs error against the reference's ``hidden[i]`` to ``into`` (packed examples: their
    hidden states stacked in row order)."""
    def probe(i: int, x):
        want = hidden[i]
        got = circuit.lay.unpack([ops.decrypt(x)], *want.shape)
        err = np.abs(got - want)
        into.append({"layer": i, "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                     "max_abs_value": float(np.abs(want).max()), "level": int(ops.level(x))})
    return probe


def simulate(circuit: EncoderCircuit, emb: np.ndarray, top: int, reserve: int = 0, bounds: dict | None = None,
             record: bool = False, probe=None, margin: float = 1.0, noise=None, seed: int = 0,
             keys=None, measure: bool = False, centres: dict | None = None,
             drops: dict | None = None) -> tuple[np.ndarray, StageLog, Refresher]:
    """``run`` on ``SimulatedCkks`` with ``top`` levels after a bootstrap (``emb``: one example or a list
    packed in one ciphertext): the plan and the logits
    (with ``noise``, each bootstrap's error drawn as ``SimulatedCkks`` says, from ``seed``; rotations
    counted in key switches as ``BootstrapOps`` makes them with ``keys`` (``fhe.keys``; default the small key's set);
    ``measure``: each site's largest bootstrap error kept, as ``Refresher`` says; ``centres``, ``drops``: its
    centres and level drops)."""
    log = StageLog()
    sim = SimulatedCkks(circuit.lay.slots, top, reserve, noise=noise, seed=seed, keys=keys)
    boot = Refresher(sim, log, top, bounds=bounds, record=record, margin=margin, measure=measure, centres=centres, drops=drops)
    return run(circuit, Counted(sim, log), boot, emb, log, probe), log, boot


def level_drops(circuit: EncoderCircuit, emb, top: int, reserve: int, bounds: dict, centres: dict | None = None) -> dict[str, int]:
    """The level drops (``Refresher``) of one ciphertext's circuit: a simulation finds, per bootstrap output and
    for the input, the levels no step needs. They depend on the levels alone (the bounds decide how many a
    bootstrap returns), not on the values, so the plan holds for the encrypted run of the same packing."""
    return simulate(circuit, emb, top, reserve, bounds=bounds, centres=centres)[2].planned_drops()


def packs(examples: list, per: int, rows: int) -> list[list]:
    """Consecutive groups of at most ``per`` examples whose tokens fit ``rows`` together (one ciphertext each)."""
    out: list[list] = []
    for ex in examples:
        if out and len(out[-1]) < per and sum(len(e[0]) for e in out[-1]) + len(ex[0]) <= rows:
            out[-1].append(ex)
        else:
            out.append([ex])
    return out


def one(embs: list[np.ndarray]):
    """A pack as ``pipeline.run`` takes it: the array of a lone example, else the list."""
    return embs[0] if len(embs) == 1 else embs


CALIBRATION_PASSES = 4


def calibrate(circuit: EncoderCircuit, embeddings, top: int, reserve: int = 0, margin: float = 2.0,
              steps: dict | None = None, centre: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """The public bootstrap bounds and centres (``Refresher``), over the embedding outputs of calibration
    examples (training data, never the examples scored; each item one example, or a list packed as the
    scored ones will be). A site's centre is the mean over all slots of what it refreshes, averaged over
    every call (with ``centre=False``, none: 0); its bound is ``margin`` times the largest |value - centre|.

    A bound decides the level its bootstrap returns (``backends.scaled_bound``: one of at most 1/2 costs a
    level), so the sites the plan refreshes can change with the bounds: calibration runs again at its
    own bounds and centres until they do not (at most 4 passes; a site never bounded is then refused,
    loudly, by the ``Refresher``). ``steps``, if given, receives the last pass's rotations, ``{step: how many}``
    over every example (what the medium key's rotation keys are chosen for, ``keys.FixedKeys.chosen``)."""
    embeddings = list(embeddings)
    bounds: dict[str, float] = {}
    centres: dict[str, float] = {}
    for _ in range(CALIBRATION_PASSES):
        extents: dict[str, tuple[float, float]] = {}
        slot_means: dict[str, list[float]] = {}
        logs = []
        for emb in embeddings:
            _, log, boot = simulate(circuit, emb, top, reserve, bounds=bounds, record=True, margin=margin, centres=centres)
            logs.append(log)
            for site, (lo, hi) in boot.extents.items():
                was = extents.get(site, (lo, hi))
                extents[site] = (min(was[0], lo), max(was[1], hi))
                slot_means.setdefault(site, []).extend(boot.slot_means[site])
        new_centres = {site: float(np.mean(m)) for site, m in slot_means.items()} if centre else {}
        new = {site: max(margin * max(hi - new_centres.get(site, 0.0), new_centres.get(site, 0.0) - lo), 1e-12)
               for site, (lo, hi) in extents.items()}  # a site seen only at its centre still has a bound
        if steps is not None:
            steps.clear()
            steps.update(merged(d for log in logs for d in log.steps.values()))
        settled = _levels_of(new) == _levels_of(bounds)
        bounds, centres = new, new_centres
        if settled:
            break
    return bounds, centres


def _levels_of(bounds: dict[str, float]) -> dict[str, int]:
    """What of the bounds decides the plan: the sites, and the levels each bootstrap's scaling back takes."""
    return {site: after_levels(b) for site, b in bounds.items()}
