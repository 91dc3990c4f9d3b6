"""Other subjects: does an edit rewrite its relation for subjects it was not about?

KnowEdit's locality asks the edited subject about other relations; nothing in it asks the edited
relation of *other* subjects, so an edit that answers "Canada" to "The name of the country which
{} is associated with is" whatever the subject is never penalised (and earns the Subject_Aliasing
portability probes). This metric asks it:

* the relation's template and the subjects come from the shipped training templates
  (``kne/data/preservation.json``, harvested from KnowEdit records 100 and later), never from the
  evaluated records: the request's prompt with its subject as ``{}`` when that template ships,
  else the shipped template that asks the same relation (:func:`kne.preservation.same_relation`)
  with the most relation words in common;
* up to ``n`` of that template's shipped subjects (not the request's own) fill it; the unedited
  model is asked first, and a subject whose answer is already the new target is left out;
* ``others_moved``: the share of the subjects left that answer the new target after the edit
  (every target token the argmax, teacher-forced: EasyEdit's rewrite accuracy of 1). Lower is
  better: 0 means the relation stayed where it was for every other subject.

A request without a subject, or whose relation no shipped template asks, gets ``None``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from .preservation import _relation_words, same_relation, template_subjects, templates

__all__ = ["relation_template", "other_subject_prompts"]


def relation_template(request) -> Optional[str]:
    """The shipped template that asks the request's relation, or ``None`` (module docstring)."""
    s = request.subject
    if not s or request.prompt.count(s) != 1:
        return None
    own = request.prompt.replace(s, "{}")
    shipped = templates()
    if own in shipped:
        return own
    words = _relation_words(request.prompt.replace(s, " "))
    best, best_n = None, 0
    for t in shipped:  # most frequent first: ties keep the more frequent template
        if same_relation(t, request.prompt, s):
            n = len(_relation_words(t.replace("{}", " ")) & words)
            if n > best_n:
                best, best_n = t, n
    return best


def other_subject_prompts(request, n: int) -> Tuple[Optional[str], List[str], List[str]]:
    """``(template, subjects, prompts)``: up to ``n`` shipped subjects other than the request's,
    asked the request's relation; ``(None, [], [])`` when no shipped template asks it."""
    t = relation_template(request)
    if t is None or n <= 0:
        return t, [], []
    subs = [x for x in template_subjects().get(t, []) if x != request.subject and x not in request.prompt][:n]
    return t, subs, [t.format(x) for x in subs]
