"""Named, versioned metric protocols (methods.md §5).

Every result row carries ``protocol`` (e.g. ``"counterfact-prob/v1"``) so that numbers computed under
different definitions are never averaged or compared by accident. Bump the version whenever a
definition changes in a way that moves numbers (tokenization rule, prompt layout, aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Protocol:
    """A metric family: its id, the per-record metric columns it produces, and how they summarise."""

    name: str
    version: int
    description: str
    metrics: tuple[str, ...]  # per-record scalar columns, each summarised as mean ×100 (except ``unscaled``)
    score_of: tuple[str, ...] = ()  # harmonic mean of these summary metrics → "score" (empty: none)
    unscaled: tuple[str, ...] = ()  # metrics that are not rates: summarised as plain means in their own unit
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.name}/v{self.version}"


COUNTERFACT_PROB = Protocol(
    name="counterfact-prob",
    version=1,
    description=(
        "CounterFact probability tests (methods.md §5.2): mean per-token NLL of ' '+target, teacher forced, "
        "ids built as ids(prefix) ⧺ ids_no_special(target) [OURS]; efficacy/paraphrase success = "
        "NLL(true) > NLL(new); neighborhood success = NLL(true) < NLL(new); per-record means."
    ),
    metrics=(
        "efficacy_success", "paraphrase_success", "neighborhood_success",
        "efficacy_diff", "paraphrase_diff", "neighborhood_diff",
        "efficacy_acc", "paraphrase_acc", "neighborhood_acc",
    ),
    score_of=("efficacy_success", "paraphrase_success", "neighborhood_success"),
)

GENERATION = Protocol(
    name="generation",
    version=1,
    description=(
        "CounterFact generation tests (methods.md §5.2): top-k 5 sampling to 100 total tokens (prompt "
        "included), one sample per generation prompt, torch.Generator seeded per (seed, case_id); "
        "fluency = mean over generations of 1/3·H2 + 2/3·H3 (bits); consistency = TF-IDF cosine with the "
        "attribute snippets (only when snippets/idf/vocab are given)."
    ),
    metrics=("fluency", "consistency"),
    unscaled=("fluency",),  # bits (≈5.5–6 for a healthy model), not ×100 as the papers print it
)

ZSRE_TOKEN_ACC = Protocol(
    name="zsre-token-acc",
    version=1,
    description=(
        "ZsRE per-token teacher-forced argmax accuracy (methods.md §5.3), one forward over "
        "prompt ⧺ target "
        "[FIX]: efficacy on the edit prompt, generalization on the rephrase, specificity on loc+'?' "
        "followed by ' '+loc_ans (fixed ground truth)."
    ),
    metrics=("efficacy", "generalization", "specificity"),
)

EASYEDIT = Protocol(
    name="easyedit",
    version=1,
    description=(
        "EasyEdit-style metrics (methods.md §5.4), left padded: reliability/generalization = per-token "
        "argmax accuracy on prompt ⧺ ' '+target; locality = fraction of answer positions where the "
        "post-edit argmax equals the cached PRE-EDIT argmax (ZsRE: loc followed by ' '+loc_ans; "
        "CounterFact: neighborhood prompts followed by target_true)."
    ),
    metrics=("reliability", "generalization", "locality"),
)

PROTOCOLS: dict[str, Protocol] = {p.id: p for p in (COUNTERFACT_PROB, GENERATION, ZSRE_TOKEN_ACC, EASYEDIT)}


def get_protocol(protocol_id: str) -> Protocol:
    try:
        return PROTOCOLS[protocol_id]
    except KeyError:
        known = ", ".join(sorted(PROTOCOLS))
        raise ValueError(f"unknown protocol {protocol_id!r} (known: {known})") from None
