"""Encrypted (CKKS, ``desilofhe``) evaluation: context, slot operations, packing, circuits, references.

The circuits of one attention layer's softmax and its product with V. A circuit evaluates a
softmax kind of the registry (``approx.softmax``) and is built from its spec by
``circuits.circuit_for(spec)``; its depth is the kind's declaration (``spec.depth``), and each has
a float64 plaintext reference that computes the same function as the kind's torch softmax:

* ``cgf_poly`` (``CgfCircuit``): the CGF softmax ``exp(s - mu - c*var) * mask / n`` with the
  polynomial exp of ``polyexp.PolyExp`` (the Chebyshev coefficients of the plaintext softmax),
  so decrypt(encrypted) matches the torch ``cgf_poly`` to CKKS precision.
* ``exact_poly`` (``ExactCircuit``): standard softmax without a max: centre by the row mean,
  polynomial exp, row sum, reciprocal by Goldschmidt iterations on an assumed sum bound, times exp;
  with ``norm_steps`` the division comes before the exp's last squarings, each then divided by its
  own row sum (what keeps the bound narrow when the scores spread by tens).

A trained ``cgf`` or ``exact`` softmax reaches its circuit through its polynomial form:
``circuit_for(spec.with_polynomial(poly))``.

Layout. A row of scores is padded to a power-of-two width ``W`` (>= its number of keys); a
ciphertext holds ``slots / W`` rows, row ``r`` in slots ``[r*W, (r+1)*W)``. Key masks, ``1/n``
and V are public (plaintext), scores are encrypted. Row sums are ``log2 W`` rotate-and-add
steps (left rotations; slot ``r*W`` then holds the row's total), a multiplication by a mask on
slot ``r*W`` (one level), and ``log2 W`` right rotations that copy it over the row's W slots.

P @ V (plaintext V): ``o[r, i] = sum_k p[r, k] V[k, i]`` is a sum over diagonals,
``o = sum_j M_j * rot_j(p)`` with ``j = k - i`` in ``[-(D-1), W-1]`` and ``M_j[r*W + i] =
V_r[i + j, i]`` (zero where ``i + j`` leaves the row, so nothing crosses rows), evaluated
baby-step giant-step: ``sum_g rot_{gB}(sum_b rot_{-gB}(M_{gB+b}) * rot_b(p))``, i.e. ``B - 1``
baby and about ``(W + D) / B`` giant rotations and ``W + D - 1`` plaintext products, one level.
The output lands in slots ``r*W + i``, ``i < D``. (An encrypted V would use the same diagonals
as ciphertexts: ciphertext products instead of plaintext ones, at the same depth.)

Every circuit is written once against a small set of slot operations, run either on
ciphertexts (``FheOps``) or on numpy slot vectors that count levels as CKKS consumes them
(``LevelledNumpyOps``, rotate = ``np.roll``), so the packing, the rotations and the depth are
testable without encryption.

Depth (levels, no bootstrapping; the softmax's declared depth plus ``PV_DEPTH`` = 1 for P @ V):
``cgf_poly`` with ``PolyExp(8, -32, 32, 5)`` 12 + 1, so a ring of 2^15 (16384 slots, 128 rows of
W=128 per ciphertext); ``exact_poly`` with the same polynomial and a row-sum bound (32, 65536) at
relative error 1e-4 (12 Goldschmidt steps) 27 + 1, a ring of 2^16.

Usage::

    circuit = circuit_for(softmax_spec("cgf", coeff=0.5).with_polynomial(PolyExp(8, -32, 32, 5)))
    ctx = FheContext.for_circuits(circuit)  # keys once; reuse it for every layer
    outs, probs, report = encrypted_attention(blocks, circuit, ctx=ctx, width=128)
    print(report.summary())  # levels, times, errors vs cgf_poly / cgf / exact

The whole student (every encoder layer, the pooler, the classifier) is one circuit in ``encoder``
(its layout, its bootstraps placed by level), run, simulated and calibrated by ``pipeline``.

``desilofhe`` is an optional dependency (``pip install -e ".[fhe]"``): it is imported only when
an ``FheContext`` is made; the packing, the references and the numpy simulation need only numpy.
"""
