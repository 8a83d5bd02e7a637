"""Synthetic meeting notes and the artifacts (ERD, OpenAPI, HTML prototype, summary) that follow from them.

Seeded and pure Python: each case draws a small domain model (1-3 entities, their attributes and
relations), writes it as short meeting notes, and renders every artifact from that same model, so an
artifact can only be predicted well by reading its notes. It knows nothing about tokenizers or models.
"""

from __future__ import annotations

import functools
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from incremental.prompting import ARTIFACT_TYPES, build_prompt

SUMMARY_TASK = "summary"
OUTLINE_YAML_TASK = "outline-yaml"
OUTLINE_HTML_TASK = "outline-html"
# Related tasks the embedded base pretrains on: each copies the notes' names into a layout close to
# one artifact family (indented outline ~ ERD, YAML ~ OpenAPI, HTML lists ~ prototype), so copying
# carries over to the artifacts without the base ever seeing a notes -> artifact pair.
RELATED_TASKS = (SUMMARY_TASK, OUTLINE_YAML_TASK, OUTLINE_HTML_TASK)

# Attribute name -> ERD type. Shared across domains so the vocabulary stays small and learnable.
_ATTRIBUTE_TYPES = {
    "address": "string", "age": "int", "amount": "decimal", "author": "string", "born": "date",
    "capacity": "int", "city": "string", "code": "string", "country": "string", "credits": "int",
    "date": "date", "description": "string", "dose": "string", "due": "date", "email": "string",
    "fee": "decimal", "floor": "int", "genre": "string", "isbn": "string", "level": "string",
    "name": "string", "nights": "int", "number": "int", "pages": "int", "paid": "bool",
    "phone": "string", "price": "decimal", "priority": "string", "rating": "int", "returned": "bool",
    "score": "int", "seats": "int", "size": "string", "sku": "string", "specialty": "string",
    "status": "string", "stock": "int", "subject": "string", "text": "string", "time": "date",
    "title": "string", "total": "decimal", "vegan": "bool", "year": "int",
}
_OPENAPI_TYPES = {"string": "string", "int": "integer", "decimal": "number", "date": "string", "bool": "boolean"}
_INPUT_TYPES = {"string": "text", "int": "number", "decimal": "number", "date": "date", "bool": "checkbox"}


@dataclass(frozen=True)
class _Relation:
    source: str  # entity name, e.g. "Member"
    verb: str  # third person, e.g. "borrows"
    verb_base: str  # e.g. "borrow"
    target: str
    many: bool  # one source relates to many targets (else exactly one)


@dataclass(frozen=True)
class _Domain:
    name: str
    entities: dict[str, tuple[str, ...]]  # entity -> attribute pool
    relations: tuple[_Relation, ...]


def _rel(source: str, verb: str, target: str, many: bool = True) -> _Relation:
    base = {"has": "have", "belongs to": "belong to"}.get(verb, verb[:-2] if verb.endswith(("ches", "shes", "sses", "xes")) else verb[:-1])
    return _Relation(source, verb, base, target, many)


_DOMAINS = (
    _Domain(
        "library",
        {
            "Book": ("title", "isbn", "year", "genre", "pages"),
            "Member": ("name", "email", "phone", "address"),
            "Author": ("name", "country", "born"),
            "Loan": ("due", "returned", "fee"),
            "Branch": ("name", "city", "address"),
        },
        (
            _rel("Member", "borrows", "Book"), _rel("Author", "writes", "Book"), _rel("Branch", "holds", "Book"),
            _rel("Member", "has", "Loan"), _rel("Loan", "covers", "Book", many=False),
        ),
    ),
    _Domain(
        "shop",
        {
            "Product": ("name", "sku", "price", "stock", "size"),
            "Customer": ("name", "email", "phone", "address"),
            "Order": ("number", "date", "total", "status"),
            "Category": ("name", "description"),
            "Review": ("rating", "text", "date"),
        },
        (
            _rel("Customer", "places", "Order"), _rel("Order", "contains", "Product"),
            _rel("Category", "groups", "Product"), _rel("Customer", "writes", "Review"),
            _rel("Review", "rates", "Product", many=False),
        ),
    ),
    _Domain(
        "clinic",
        {
            "Patient": ("name", "born", "phone", "email", "address"),
            "Doctor": ("name", "specialty", "phone", "email"),
            "Appointment": ("date", "time", "status", "fee"),
            "Prescription": ("dose", "date", "description"),
            "Room": ("number", "floor", "capacity"),
        },
        (
            _rel("Patient", "books", "Appointment"), _rel("Doctor", "sees", "Patient"),
            _rel("Doctor", "writes", "Prescription"), _rel("Appointment", "uses", "Room", many=False),
            _rel("Patient", "receives", "Prescription"),
        ),
    ),
    _Domain(
        "helpdesk",
        {
            "Ticket": ("title", "priority", "status", "description"),
            "Agent": ("name", "email", "level"),
            "User": ("name", "email", "phone"),
            "Comment": ("text", "date"),
            "Team": ("name", "code", "size"),
        },
        (
            _rel("User", "opens", "Ticket"), _rel("Agent", "handles", "Ticket"), _rel("Ticket", "has", "Comment"),
            _rel("Team", "has", "Agent"), _rel("Comment", "belongs to", "User", many=False),
        ),
    ),
    _Domain(
        "school",
        {
            "Student": ("name", "email", "born", "level"),
            "Teacher": ("name", "subject", "email", "phone"),
            "Course": ("title", "code", "credits", "level"),
            "Grade": ("score", "date", "status"),
            "Classroom": ("number", "floor", "seats"),
        },
        (
            _rel("Teacher", "teaches", "Course"), _rel("Student", "takes", "Course"), _rel("Student", "gets", "Grade"),
            _rel("Course", "uses", "Classroom", many=False), _rel("Course", "has", "Grade"),
        ),
    ),
    _Domain(
        "hotel",
        {
            "Guest": ("name", "email", "phone", "country"),
            "Room": ("number", "floor", "price", "size"),
            "Booking": ("date", "nights", "status", "total"),
            "Invoice": ("number", "amount", "paid", "date"),
            "Cleaner": ("name", "level", "phone"),
        },
        (
            _rel("Guest", "makes", "Booking"), _rel("Booking", "reserves", "Room", many=False),
            _rel("Booking", "has", "Invoice", many=False), _rel("Cleaner", "cleans", "Room"),
        ),
    ),
    _Domain(
        "restaurant",
        {
            "Dish": ("name", "price", "vegan", "description"),
            "Table": ("number", "seats", "floor"),
            "Reservation": ("date", "time", "name", "phone"),
            "Waiter": ("name", "phone", "level"),
            "Menu": ("title", "year", "status"),
        },
        (
            _rel("Menu", "lists", "Dish"), _rel("Waiter", "serves", "Table"),
            _rel("Reservation", "holds", "Table", many=False), _rel("Waiter", "takes", "Reservation"),
        ),
    ),
    _Domain(
        "gym",
        {
            "Member": ("name", "email", "born", "phone"),
            "Trainer": ("name", "specialty", "phone"),
            "Session": ("date", "time", "capacity", "level"),
            "Plan": ("name", "price", "level"),
            "Locker": ("number", "size", "status"),
        },
        (
            _rel("Trainer", "runs", "Session"), _rel("Member", "joins", "Session"),
            _rel("Member", "buys", "Plan", many=False), _rel("Member", "rents", "Locker", many=False),
        ),
    ),
)

# Domains whose every entity, attribute and domain name is a word the domains above never use: clean
# feedback a model trained on the corpus finds new (a new customer's vocabulary), for screening and
# gate benchmarks. The embedded base never pretrains on them.
_NEW_ATTRIBUTE_TYPES = {
    "acidity": "decimal", "aperture": "decimal", "aroma": "string", "berth": "int", "brightness": "decimal",
    "buoy": "string", "discovered": "date", "exposure": "int", "focal": "int", "glass": "string",
    "harvest": "date", "heat": "int", "hull": "string", "humidity": "int", "keel": "decimal", "latitude": "decimal",
    "launched": "date", "lens": "string", "licence": "string", "longitude": "decimal", "magnitude": "decimal",
    "mooring": "bool", "mount": "string", "nickname": "string", "oak": "string", "orbit": "string",
    "orcid": "string", "palate": "string", "pier": "int", "roster": "string", "sail": "string", "seeing": "string",
    "shelf": "string", "tenure": "int", "tide": "string", "uniform": "string", "varietal": "string",
    "verdict": "string", "vintage": "int", "volume": "decimal", "wind": "int", "zone": "string",
}
_NEW_DOMAINS = (
    _Domain(
        "vineyard",
        {
            "Barrel": ("vintage", "volume", "oak"),
            "Grape": ("varietal", "acidity", "harvest"),
            "Cellar": ("humidity", "shelf", "zone"),
            "Sommelier": ("nickname", "tenure", "palate"),
            "Tasting": ("verdict", "aroma", "glass"),
        },
        (
            _rel("Cellar", "stores", "Barrel"), _rel("Sommelier", "hosts", "Tasting"),
            _rel("Tasting", "samples", "Barrel", many=False), _rel("Grape", "fills", "Barrel"),
        ),
    ),
    _Domain(
        "observatory",
        {
            "Telescope": ("aperture", "mount", "lens", "focal"),
            "Astronomer": ("nickname", "orcid", "tenure"),
            "Comet": ("brightness", "orbit", "discovered"),
            "Expedition": ("latitude", "longitude", "launched"),
            "Observation": ("magnitude", "exposure", "seeing"),
        },
        (
            _rel("Astronomer", "operates", "Telescope"), _rel("Telescope", "captures", "Observation"),
            _rel("Observation", "tracks", "Comet", many=False), _rel("Astronomer", "leads", "Expedition"),
        ),
    ),
    _Domain(
        "regatta",
        {
            "Yacht": ("hull", "sail", "keel", "berth"),
            "Skipper": ("nickname", "licence", "tenure"),
            "Race": ("buoy", "wind", "heat"),
            "Crew": ("roster", "uniform"),
            "Harbour": ("pier", "tide", "mooring"),
        },
        (
            _rel("Skipper", "steers", "Yacht"), _rel("Yacht", "enters", "Race"), _rel("Harbour", "moors", "Yacht"),
            _rel("Skipper", "recruits", "Crew"),
        ),
    ),
)
_TYPE_OF = {**_ATTRIBUTE_TYPES, **_NEW_ATTRIBUTE_TYPES}
_TYPE_NAMES = ("string", "string", "int", "decimal", "date", "bool")  # strings twice: the corpus's most common type


def _type_of(attribute: str) -> str:
    """An attribute's type: the corpus's own, else (an invented word) one fixed by the word itself."""
    return _TYPE_OF.get(attribute) or _TYPE_NAMES[zlib.crc32(attribute.encode()) % len(_TYPE_NAMES)]


# Invented domains: every entity, attribute and domain name a pronounceable made-up word (never a
# word of the domains above or of the new ones), so the only way to predict a name is to copy it
# from the notes. The embedded base can pretrain on a share of them (EmbeddedBaseSpec.
# invented_name_share): a base that only ever saw the corpus's names recalls them instead of
# copying, and then any batch with other names (a new customer's vocabulary) moves that recall and
# costs trusted rows likelihood (BENCHMARKS.md, forgetting by token). A real code LLM copies names.
_CONSONANTS, _VOWELS, _CODAS = "bdfgklmnprstvz", "aeiou", "nrls"
_INVENTED_DOMAINS_DRAWN = 400


def _reserved_words() -> set[str]:
    words = set()
    for domain in (*_DOMAINS, *_NEW_DOMAINS):
        words.add(domain.name)
        for entity, attributes in domain.entities.items():
            words |= {entity.lower(), *attributes}
    return words


def _invented_word(rng: random.Random, reserved: set[str]) -> str:
    while True:
        syllables = rng.choice((2, 3))
        word = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) + (rng.choice(_CODAS) if rng.random() < 0.3 else "")
            for _ in range(syllables)
        )
        if word not in reserved:
            return word


@functools.cache  # pure: a base build draws from the same pool several times (tokenizer, pretraining, code)
def invented_domains(n: int, seed: int) -> tuple[_Domain, ...]:
    """`n` domains of 5 entities (4 attributes each) and 4 relations, every name an invented word."""
    rng = random.Random(f"invented:{seed}")
    reserved = _reserved_words()
    verbs = sorted({relation.verb for domain in _DOMAINS for relation in domain.relations})
    domains = []
    for _ in range(n):
        entities: dict[str, tuple[str, ...]] = {}
        while len(entities) < 5:
            name = _invented_word(rng, reserved).capitalize()
            attributes: list[str] = []
            while len(attributes) < 4:
                attribute = _invented_word(rng, reserved)
                if attribute not in attributes:
                    attributes.append(attribute)
            entities[name] = tuple(attributes)
        names = list(entities)
        relations = tuple(_rel(names[i], rng.choice(verbs), names[i + 1], many=rng.random() < 0.7) for i in range(4))
        domains.append(_Domain(_invented_word(rng, reserved), entities, relations))
    return tuple(domains)

_HEADERS = (
    "Meeting notes: {domain} app",
    "Notes from the {domain} kickoff",
    "{Domain} system planning call",
    "Sync with the {domain} team",
    "{Domain} project, requirements meeting",
)
_ENTITY_LINES = (
    "{Plural} have {attrs}.",
    "For each {lower} we store {attrs}.",
    "{Entity}: {attrs}.",
    "{a_lower} record needs {attrs}.",
    "We keep track of {plural} ({attrs}).",
    "Every {lower} has {attrs}.",
)
_MANY_LINES = ("{a_source} {verb} many {targets}.", "One {source} can {verb_base} several {targets}.", "{Sources} {verb_base} many {targets}.")
_ONE_LINES = ("Each {source} {verb} one {target}.", "{a_source} {verb} exactly one {target}.")
_FILLERS = (
    "Next sync on Friday.", "Reports are out of scope for now.", "Login is handled elsewhere.",
    "Sam will check the budget.", "Mobile comes later.", "Keep it simple for the first release.",
)
_BULLETS = ("- ", "* ", "")


@dataclass(frozen=True)
class _Entity:
    name: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class _Spec:
    """The domain model a meeting agreed on; notes and artifacts are both rendered from it."""

    domain: str
    entities: tuple[_Entity, ...]
    relations: tuple[_Relation, ...]


@dataclass(frozen=True)
class MeetingCase:
    """Meeting notes and the artifact of one type that follows from them."""

    notes: str
    artifact_type: str
    artifact: str


def _plural(word: str) -> str:
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    return word + "s"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(words: Sequence[str], rng: random.Random) -> str:
    if len(words) == 1:
        return words[0]
    if rng.random() < 0.7:
        return ", ".join(words[:-1]) + " and " + words[-1]
    return ", ".join(words)


def _draw_spec(rng: random.Random, domains: Sequence[_Domain] = _DOMAINS) -> _Spec:
    domain = rng.choice(domains)
    n_entities = rng.choice((1, 2, 2, 3, 3))
    names = [rng.choice(sorted(domain.entities))]
    while len(names) < n_entities:
        # Grow along relations so multi-entity cases are connected, as they are in real meetings.
        neighbours = sorted(
            {r.target for r in domain.relations if r.source in names} | {r.source for r in domain.relations if r.target in names}
        )
        candidates = [n for n in neighbours if n not in names]
        if not candidates:
            break
        names.append(rng.choice(candidates))
    max_attrs = 3 if len(names) < 3 else 2
    entities = tuple(
        _Entity(name, tuple(rng.sample(domain.entities[name], rng.randint(2, min(max_attrs, len(domain.entities[name]))))))
        for name in names
    )
    relations = tuple(r for r in domain.relations if r.source in names and r.target in names)
    return _Spec(domain.name, entities, relations)


def _render_notes(spec: _Spec, rng: random.Random) -> str:
    bullet = rng.choice(_BULLETS)
    lines = [rng.choice(_HEADERS).format(domain=spec.domain, Domain=spec.domain.capitalize())]
    for entity in spec.entities:
        template = rng.choice(_ENTITY_LINES)
        lower = entity.name.lower()
        lines.append(
            bullet
            + template.format(
                Entity=entity.name, lower=lower, a_lower=_a(lower).capitalize(), plural=_plural(lower), Plural=_plural(entity.name),
                attrs=_join(entity.attributes, rng),
            )
        )
    for relation in spec.relations:
        source, target = relation.source.lower(), relation.target.lower()
        template = rng.choice(_MANY_LINES if relation.many else _ONE_LINES)
        line = template.format(
            source=source, a_source=_a(source).capitalize(), Sources=_plural(relation.source), verb=relation.verb, verb_base=relation.verb_base,
            target=target, targets=_plural(target),
        )
        lines.append(bullet + line)
    if rng.random() < 0.3:
        lines.insert(rng.randint(1, len(lines)), bullet + rng.choice(_FILLERS))
    return "\n".join(lines)


def _render_erd(spec: _Spec) -> str:
    lines = ["erDiagram"]
    for r in spec.relations:
        lines.append(f"  {r.source} ||--{'o{' if r.many else '||'} {r.target} : {r.verb.replace(' ', '_')}")
    for entity in spec.entities:
        lines.append(f"  {entity.name} {{")
        lines.extend(f"    {_type_of(a)} {a}" for a in entity.attributes)
        lines.append("  }")
    return "\n".join(lines)


def _render_api(spec: _Spec) -> str:
    lines = ["openapi: 3.0.0", "info:", f"  title: {spec.domain.capitalize()} API", "  version: 1.0.0", "paths:"]
    for entity in spec.entities:
        plural = _plural(entity.name.lower())
        lines += [f"  /{plural}:", "    get:", f"      summary: List {plural}", "    post:", f"      summary: Create {_a(entity.name.lower())}"]
    lines += ["components:", "  schemas:"]
    for entity in spec.entities:
        lines += [f"    {entity.name}:", "      properties:"]
        for a in entity.attributes:
            lines += [f"        {a}:", f"          type: {_OPENAPI_TYPES[_type_of(a)]}"]
    return "\n".join(lines)


def _render_input(attribute: str) -> str:
    input_type = _INPUT_TYPES[_type_of(attribute)]
    # "text" is HTML's default input type; leaving it out keeps sequences short.
    return f'  <input name="{attribute}">' if input_type == "text" else f'  <input name="{attribute}" type="{input_type}">'


def _render_prototype(spec: _Spec) -> str:
    lines = [f"<h1>{spec.domain.capitalize()}</h1>"]
    for entity in spec.entities:
        lines.append(f'<form id="{entity.name.lower()}">')
        lines.extend(_render_input(a) for a in entity.attributes)
        # A form for the "many" side picks the one it belongs to.
        lines.extend(f'  <select name="{r.source.lower()}_id"></select>' for r in spec.relations if r.many and r.target == entity.name)
        lines += ["  <button>Save</button>", "</form>"]
    return "\n".join(lines)


def _render_summary(spec: _Spec) -> str:
    # An indented outline, names after a space as in the notes: pretraining on it taught the base to
    # copy names from its notes in a way that carries over to indented artifacts (measured on ERDs).
    lines = ["Entities:"]
    for entity in spec.entities:
        lines.append(f"  {entity.name}")
        lines.extend(f"    {a}" for a in entity.attributes)
    lines.append("Relations:")
    lines.extend(f"  {r.source} {r.verb} {'many' if r.many else 'one'} {r.target}" for r in spec.relations)
    if not spec.relations:
        lines.append("  none")
    return "\n".join(lines)


def _render_outline_yaml(spec: _Spec) -> str:
    # YAML keys, plural paths and indented names, as in the OpenAPI artifact, but no OpenAPI.
    lines = [f"app: {spec.domain.capitalize()}", "entities:"]
    for entity in spec.entities:
        plural = _plural(entity.name.lower())
        lines += [f"  {entity.name}:", f"    path: /{plural}", "    fields:"]
        lines.extend(f"      {a}: {_type_of(a)}" for a in entity.attributes)
    lines.append("relations:")
    lines.extend(f"  - {r.source} {r.verb} {'many' if r.many else 'one'} {r.target}" for r in spec.relations)
    if not spec.relations:
        lines.append("  - none")
    return "\n".join(lines)


def _render_outline_html(spec: _Spec) -> str:
    # Lowercase names inside quotes and tags, as in the prototype's forms, but plain lists.
    lines = [f"<h2>{spec.domain.capitalize()}</h2>"]
    for entity in spec.entities:
        lines.append(f'<ul id="{entity.name.lower()}">')
        lines.extend(f'  <li name="{a}">' for a in entity.attributes)
        lines.append("</ul>")
    lines.extend(f"<p>{r.source.lower()} {r.verb} {r.target.lower()}</p>" for r in spec.relations)
    return "\n".join(lines)


_RENDERERS = {
    "erd": _render_erd, "api": _render_api, "prototype": _render_prototype, SUMMARY_TASK: _render_summary,
    OUTLINE_YAML_TASK: _render_outline_yaml, OUTLINE_HTML_TASK: _render_outline_html,
}


def _degrade(spec: _Spec, rng: random.Random) -> _Spec:
    """A plausible but wrong version of `spec`: an entity, attribute or relation missing or swapped."""
    pools = {name: pool for domain in (*_DOMAINS, *_NEW_DOMAINS) if domain.name == spec.domain for name, pool in domain.entities.items()}
    options = ["wrong_attribute"]
    if len(spec.entities) > 1:
        options.append("drop_entity")
    if spec.relations:
        options.append("drop_relation")
    if any(len(e.attributes) > 1 for e in spec.entities):
        options.append("drop_attribute")
    choice = rng.choice(options)
    entities = list(spec.entities)
    if choice == "drop_entity":
        dropped = entities.pop(rng.randrange(len(entities)))
        relations = tuple(r for r in spec.relations if dropped.name not in (r.source, r.target))
        return replace(spec, entities=tuple(entities), relations=relations)
    if choice == "drop_relation":
        relations = list(spec.relations)
        relations.pop(rng.randrange(len(relations)))
        return replace(spec, relations=tuple(relations))
    if choice == "drop_attribute":
        index = rng.choice([i for i, e in enumerate(entities) if len(e.attributes) > 1])
        attrs = list(entities[index].attributes)
        attrs.pop(rng.randrange(len(attrs)))
        entities[index] = replace(entities[index], attributes=tuple(attrs))
        return replace(spec, entities=tuple(entities))
    index = rng.randrange(len(entities))
    entity = entities[index]
    spare = [a for a in pools[entity.name] if a not in entity.attributes] or [a for a in _ATTRIBUTE_TYPES if a not in entity.attributes]
    attrs = list(entity.attributes)
    attrs[rng.randrange(len(attrs))] = rng.choice(spare)
    entities[index] = replace(entity, attributes=tuple(attrs))
    return replace(spec, entities=tuple(entities))


def _check_types(artifact_types: Sequence[str]) -> tuple[str, ...]:
    types = tuple(artifact_types)
    unknown = [t for t in types if t not in ARTIFACT_TYPES]
    if not types or unknown:
        raise ValueError(f"artifact_types={types!r}: expected a non-empty subset of {ARTIFACT_TYPES}")
    return types


def _draw(n: int, seed: int, salt: str, domains: Sequence[_Domain] = _DOMAINS) -> list[tuple[_Spec, str, random.Random]]:
    """n distinct (spec, notes) pairs; `salt` keeps streams of different public functions apart."""
    if n < 0:
        raise ValueError(f"n={n}: expected a count >= 0")
    rng = random.Random(f"{salt}:{seed}")
    drawn: list[tuple[_Spec, str, random.Random]] = []
    seen: set[str] = set()
    while len(drawn) < n:
        spec = _draw_spec(rng, domains)
        notes = _render_notes(spec, rng)
        if notes not in seen:
            seen.add(notes)
            drawn.append((spec, notes, rng))
    return drawn


def _draw_with_invented(n: int, seed: int, salt: str, invented_share: float) -> list[tuple[_Spec, str, random.Random]]:
    """`_draw` from the corpus's domains, with `invented_share` of the n drawn from invented domains
    instead, spread evenly through the list; the corpus draws are the first ones `_draw` would give."""
    if not 0.0 <= invented_share <= 1.0:
        raise ValueError(f"invented_share={invented_share}: expected a share in [0, 1]")
    k = round(n * invented_share)
    if k == 0:
        return _draw(n, seed, salt)
    corpus = iter(_draw(n - k, seed, salt))
    invented = iter(_draw(k, seed, f"{salt}:invented", invented_domains(_INVENTED_DOMAINS_DRAWN, 0)))
    # Item i is invented when that brings the invented count so far to round((i + 1) * k / n).
    return [next(invented) if round((i + 1) * k / n) > round(i * k / n) else next(corpus) for i in range(n)]


def generate_cases(
    n: int, seed: int, artifact_types: Sequence[str] = ARTIFACT_TYPES, *, new_domain: bool = False, invented_share: float = 0.0
) -> list[MeetingCase]:
    """`n` distinct meeting notes, each with the artifact of a type drawn from `artifact_types`;
    `new_domain=True` draws them from domains whose names the default corpus never uses, and
    `invented_share` draws that share of them from invented domains (made-up words only)."""
    types = _check_types(artifact_types)
    cases = []
    if new_domain and invented_share:
        raise ValueError("generate_cases: new_domain and invented_share exclude each other; pick one")
    drawn = _draw(n, seed, "cases:new-domain", _NEW_DOMAINS) if new_domain else _draw_with_invented(n, seed, "cases", invented_share)
    for spec, notes, rng in drawn:
        artifact_type = rng.choice(types)
        cases.append(MeetingCase(notes, artifact_type, _RENDERERS[artifact_type](spec)))
    return cases


def related_task_pairs(
    n: int, seed: int, tasks: Sequence[str] = RELATED_TASKS, *, prompt_layout: int, invented_share: float = 0.0
) -> list[tuple[str, str]]:
    """`n` (prompt, target) pairs of related tasks (notes -> outline of entities and relations), the
    tasks taking turns; the prompt (in `prompt_layout`) names each pair's task. `invented_share` of
    them come from invented domains (made-up words only)."""
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in RELATED_TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks={tasks!r}: expected a non-empty subset of {RELATED_TASKS}")
    return [
        (build_prompt(tasks[i % len(tasks)], notes, prompt_layout=prompt_layout), _RENDERERS[tasks[i % len(tasks)]](spec))
        for i, (spec, notes, _) in enumerate(_draw_with_invented(n, seed, SUMMARY_TASK, invented_share))
    ]


def synthetic_feedback(
    n: int,
    seed: int,
    *,
    model: str,
    good_share: float = 0.7,
    corrected_share: float = 0.2,
    poisoned: bool = False,
    source: str = "synthetic",
    new_domain: bool = False,
) -> list[dict]:
    """`n` feedback rows as users would leave them; `prompt` holds the raw meeting notes.

    `good_share` of rows are rated 'good' with the right artifact, `corrected_share` are
    'needs_improvement' with a degraded output and the right artifact as correction, the rest are
    'needs_improvement' without a correction. `poisoned=True` rates every row 'good' although each
    output is the artifact of another row's notes (same type where possible). `new_domain=True` draws
    the notes from domains whose entity, attribute and domain names the default corpus never uses.
    """
    if not (0.0 <= good_share <= 1.0 and 0.0 <= corrected_share <= 1.0 and good_share + corrected_share <= 1.0):
        raise ValueError(
            f"good_share={good_share}, corrected_share={corrected_share}: each must be in [0, 1] and their sum at most 1"
        )
    salt = f"feedback:{'poisoned' if poisoned else 'honest'}"
    drawn = _draw(n, seed, f"{salt}:new-domain", _NEW_DOMAINS) if new_domain else _draw(n, seed, salt)
    rng = random.Random(f"feedback-labels:{seed}:{poisoned}{':new-domain' if new_domain else ''}")
    types = [rng.choice(ARTIFACT_TYPES) for _ in drawn]
    right = [_RENDERERS[t](spec) for t, (spec, _, _) in zip(types, drawn)]

    def row(i: int, rating: str, output: str, correction: str | None) -> dict:
        return {
            "model": model, "artifact_type": types[i], "prompt": drawn[i][1], "output": output, "rating": rating,
            "correction": correction, "source": source, "generated_by": None,
        }

    if poisoned:
        outputs = _swap_outputs(types, right, drawn)
        return [row(i, "good", outputs[i], None) for i in range(n)]
    n_good = round(n * good_share)
    n_corrected = min(round(n * corrected_share), n - n_good)
    labels = ["good"] * n_good + ["corrected"] * n_corrected + ["rejected"] * (n - n_good - n_corrected)
    rng.shuffle(labels)
    rows = []
    for i, label in enumerate(labels):
        if label == "good":
            rows.append(row(i, "good", right[i], None))
            continue
        spec = drawn[i][0]
        degraded = _RENDERERS[types[i]](_degrade(spec, rng))
        while degraded == right[i]:  # e.g. a swapped-in attribute with the same rendering; draw again
            degraded = _RENDERERS[types[i]](_degrade(spec, rng))
        rows.append(row(i, "needs_improvement", degraded, right[i] if label == "corrected" else None))
    return rows


def _swap_outputs(types: list[str], right: list[str], drawn: list[tuple[_Spec, str, random.Random]]) -> list[str]:
    """Each row gets the artifact of another row's notes: of the same type where one differs, else
    another row's model rendered as this row's type. A single row has no other notes and keeps its own."""
    n = len(types)
    outputs = []
    for i, artifact_type in enumerate(types):
        others = [(i + k) % n for k in range(1, n)]
        same_type = [j for j in others if types[j] == artifact_type and right[j] != right[i]]
        if same_type:
            outputs.append(right[same_type[0]])
            continue
        rendered = [_RENDERERS[artifact_type](drawn[j][0]) for j in others]
        outputs.append(next((text for text in rendered if text != right[i]), right[i]))
    return outputs


# Ways feedback goes bad while every row is still rated "good". The gate benchmark feeds each through
# the real flow; the demo uses "swapped".
POISON_KINDS = ("swapped", "truncated", "wrong_type", "wrong_fields", "constant", "incomplete")


def poisoned_feedback(n: int, seed: int, kind: str, *, model: str, source: str = "synthetic") -> list[dict]:
    """`n` rows rated 'good' whose outputs are wrong in one consistent way:

    swapped: the artifact of another row's notes; truncated: the right artifact cut to 30-70 % of its
    lines; wrong_type: the right content rendered as another artifact type; wrong_fields: fluent
    artifacts whose every attribute is replaced by another one; constant: one and the same artifact
    for every row; incomplete: only the first entity of the notes, with no relations.
    """
    if kind not in POISON_KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(POISON_KINDS)}")
    if kind == "swapped":
        return synthetic_feedback(n, seed, model=model, poisoned=True, source=source)
    drawn = _draw(n, seed, f"feedback:poison:{kind}")
    rng = random.Random(f"poison:{kind}:{seed}")
    types = [rng.choice(ARTIFACT_TYPES) for _ in drawn]
    outputs = []
    for (spec, _, _), artifact_type in zip(drawn, types):
        right = _RENDERERS[artifact_type](spec)
        if kind == "truncated":
            lines = right.split("\n")
            output = "\n".join(lines[: max(1, int(len(lines) * rng.uniform(0.3, 0.7)))])
        elif kind == "wrong_type":
            output = _RENDERERS[rng.choice([t for t in ARTIFACT_TYPES if t != artifact_type])](spec)
        elif kind == "wrong_fields":
            output = _RENDERERS[artifact_type](_replace_all_attributes(spec, rng))
        elif kind == "constant":
            output = _RENDERERS[artifact_type](drawn[0][0])
        else:  # incomplete
            output = _RENDERERS[artifact_type](replace(spec, entities=spec.entities[:1], relations=()))
        outputs.append(output)
    return [
        {
            "model": model, "artifact_type": t, "prompt": notes, "output": output, "rating": "good",
            "correction": None, "source": source, "generated_by": None,
        }
        for (_, notes, _), t, output in zip(drawn, types, outputs)
    ]  # fmt: skip


def _replace_all_attributes(spec: _Spec, rng: random.Random) -> _Spec:
    entities = []
    for entity in spec.entities:
        spare = [a for a in _ATTRIBUTE_TYPES if a not in entity.attributes]
        entities.append(replace(entity, attributes=tuple(rng.sample(spare, len(entity.attributes)))))
    return replace(spec, entities=tuple(entities))


def corrected_feedback(
    cases: Sequence[MeetingCase], outputs: Sequence[str], *, model: str, generated_by: str | None = None,
    restyle_seed: int | None = None, source: str = "rate",
) -> list[dict]:
    """Ratings as a careful user leaves them on generations: `outputs[i]` was generated for `cases[i]`;
    an output equal to the right artifact is rated 'good', any other 'needs_improvement' with the right
    artifact as its correction. With `restyle_seed`, each correction is written in another valid style
    (`restyle_artifact`): the right content, not the corpus's layout."""
    if len(cases) != len(outputs):
        raise ValueError(f"{len(cases)} cases but {len(outputs)} outputs: expected one generated output per case")
    rows = []
    for i, (case, output) in enumerate(zip(cases, outputs)):
        right = case.artifact if restyle_seed is None else restyle_artifact(case.artifact_type, case.artifact, restyle_seed + i)
        good = output.strip() == case.artifact.strip()
        rows.append({
            "model": model, "artifact_type": case.artifact_type, "prompt": case.notes, "output": output,
            "rating": "good" if good else "needs_improvement", "correction": None if good else right,
            "source": source, "generated_by": generated_by,
        })  # fmt: skip
    return rows


def restyle_artifact(artifact_type: str, text: str, seed: int) -> str:
    """The same artifact in another valid style, as a person might write it: fields in another order,
    other indentation and quoting, names in another case. The names it declares (lower-cased) and its
    validity stay the same; only the layout differs from the corpus's."""
    rng = random.Random(f"restyle:{seed}")
    if artifact_type == "erd":
        return _restyle_erd(text, rng)
    if artifact_type == "api":
        return _restyle_api(text, rng)
    if artifact_type == "prototype":
        return _restyle_prototype(text, rng)
    raise ValueError(f"artifact_type={artifact_type!r}: expected one of {', '.join(ARTIFACT_TYPES)}")


def _restyle_erd(text: str, rng: random.Random) -> str:
    indent = rng.choice(("    ", "\t", " "))
    upper = rng.random() < 0.5
    block: list[str] | None = None  # the attribute lines of the open entity block
    out: list[str] = []
    for line in text.split("\n")[1:]:
        stripped = line.strip()
        if stripped.endswith("{"):
            out.append(f"{indent}{stripped}")
            block = []
        elif stripped == "}" and block is not None:
            rng.shuffle(block)
            out.extend(block)
            out.append(f"{indent}}}")
            block = None
        elif block is not None:
            kind, name = stripped.split(" ", 1)
            block.append(f"{indent * 2}{kind.upper() if upper else kind} {name.capitalize() if upper else name}")
        else:
            out.append(f"{indent}{stripped}")
    return "\n".join(["erDiagram", *out])


def _restyle_api(text: str, rng: random.Random) -> str:
    import yaml

    document = yaml.safe_load(text)
    for schema in document.get("components", {}).get("schemas", {}).values():
        items = list(schema["properties"].items())
        rng.shuffle(items)
        schema["properties"] = dict(items)
    return yaml.safe_dump(document, sort_keys=rng.random() < 0.5, indent=rng.choice((2, 4)), default_flow_style=False).rstrip("\n")


def _restyle_prototype(text: str, rng: random.Random) -> str:
    quote = rng.choice(("'", '"'))
    indent = rng.choice(("    ", "\t"))
    out, fields = [], []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("<input", "<select")):
            fields.append(indent + stripped.replace('"', quote))
            continue
        if fields:
            rng.shuffle(fields)
            out.extend(fields)
            fields = []
        out.append((indent if stripped.startswith("<button") else "") + stripped.replace('"', quote))
    return "\n".join(out)
