"""maprl.features.matching: the pixel retriever (orientation correlation) and its use as the map memory's
candidate source (``agent.retriever: orientation``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from maprl.data.perturb import rotate
from maprl.features.matching import OrientationMatcher, inscribed_side
from maprl.views import crop_views, valid_centres

from conftest import grid_targets, make_map, textured_rgb, tiny_params

V = 48


@pytest.fixture(scope="module")
def world() -> tuple[np.ndarray, np.ndarray]:
    rgb = textured_rgb(256, seed=3)
    return rgb, valid_centres(np.ones(rgb.shape[:2], bool), V)


def places(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(V, 256 - V, size=(n, 2)).round()


def found(pos: np.ndarray, xy: np.ndarray, radius: float = 4.0) -> np.ndarray:
    return np.hypot(*(pos[:, 0] - xy).T) <= radius


@pytest.mark.parametrize("view, factor", [(48, 2), (128, 2), (224, 3), (64, 1)])
def test_inscribed_side_fits_a_turned_view_in_whole_blocks(view: int, factor: int) -> None:
    side = inscribed_side(view, factor)
    assert view / np.sqrt(2) - 2 * factor <= side <= view / np.sqrt(2) and (view - side) % (2 * factor) == 0


def test_a_crop_of_the_map_is_found_at_its_place(world: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, ok = world
    xy = places(6)
    pos, scores = OrientationMatcher(rgb, ok, V, 16.0).query(crop_views(rgb, xy[:, 0], xy[:, 1], V), k=3)
    assert pos.shape == (6, 3, 2) and scores.shape == (6, 3)
    assert found(pos, xy, 0.5).all() and (scores[:, 0] > 0.9).all()  # the photo's own borders differ a little
    assert (scores[:, 0] >= scores[:, 1]).all() and (scores[:, 1] >= scores[:, 2]).all()


def test_another_date_with_reversed_contrast_and_new_colours_is_found(world: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, ok = world
    other = (255 - rgb[..., ::-1]).astype(np.uint8)  # every edge kept, every grey level and colour changed
    xy = places(6, seed=1)
    pos, _ = OrientationMatcher(rgb, ok, V, 16.0).query(crop_views(other, xy[:, 0], xy[:, 1], V))
    assert found(pos, xy).all()


def test_a_turned_photo_needs_the_heading_search(world: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, ok = world
    xy = places(6, seed=2)
    quarter = np.stack([rotate(p, 90.0) for p in crop_views(rgb, xy[:, 0], xy[:, 1], V)])
    assert found(OrientationMatcher(rgb, ok, V, 16.0, headings=4).query(quarter)[0], xy).all()
    assert not found(OrientationMatcher(rgb, ok, V, 16.0, headings=1).query(quarter)[0], xy).all()
    eighth = np.stack([rotate(p, 45.0) for p in crop_views(rgb, xy[:, 0], xy[:, 1], V)])
    assert found(OrientationMatcher(rgb, ok, V, 16.0, headings=8).query(eighth)[0], xy).all()
    odd = OrientationMatcher(rgb, ok, V, 16.0, headings=8, factor=5)  # a view of 48 px is no whole number of blocks
    assert found(odd.query(eighth)[0], xy).all()


def test_candidates_are_separated_on_valid_centres_and_remembered(world: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, _ = world
    ok = valid_centres(np.ones(rgb.shape[:2], bool), V)
    ok[:, :128] = False  # only the right half may hold a candidate
    matcher = OrientationMatcher(rgb, ok, V, 40.0)
    photos = crop_views(rgb, np.array([60.0, 200.0]), np.array([100.0, 100.0]), V)
    pos, _ = matcher.query(photos, k=4)
    assert (pos[..., 0] >= 128).all()
    for p in pos:
        d = np.hypot(*(p[:, None] - p[None]).transpose(2, 0, 1))
        assert (d[np.triu_indices(4, 1)] > 40.0).all()
    calls = []
    matcher._search = lambda photo, k: calls.append(k) or (np.zeros((k, 2)), np.zeros(k))  # type: ignore[method-assign]
    again, _ = matcher.query(photos, k=4)
    np.testing.assert_array_equal(again, pos)
    assert calls == []


def test_bad_settings_name_the_limits(world: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, ok = world
    with pytest.raises(ValueError, match="headings >= 1"):
        OrientationMatcher(rgb, ok, V, 16.0, headings=0)


def _inverted_scene() -> tuple:
    """Three targets whose photos are another "date" (reversed contrast), a memory with a pixel matcher, and a
    NavCore in the candidates action space (no STOP: the own stop rule ends episodes)."""
    from maprl.nav.core import NavConfig, NavCore
    from maprl.nav.runtime import pooled_memory
    from maprl.nav.scene import Scene

    m = make_map(192, seed=4)
    targets = grid_targets([60.0, 130.0, 100.0], [70.0, 120.0, 40.0], ["test"] * 3)
    base = Scene.build(m, targets, 32)
    xy = base.targets_xy
    photos = (255 - crop_views(m.rgb, xy[:, 0], xy[:, 1], 32)).astype(np.uint8)
    scene = base.with_photos(photos, base.space.embed_view(photos), "inverted")
    memory = pooled_memory(scene, 4, 16.0)
    memory.matcher = OrientationMatcher(m.rgb, scene.ok, 32, 16.0)
    cfg = NavConfig.of(memory="retrieval", n_candidates=2, actions="candidates", success_radius=8.0, max_steps=60)
    return scene, memory, NavCore(scene, 3, cfg, memory), xy, photos


def test_the_env_takes_its_candidates_from_the_photo_pixels_with_retriever_orientation() -> None:
    """A photo from another "date" (reversed contrast): the encoder's memory may miss it, the pixel
    retriever puts its place first, and the candidates' similarities are the matcher's scores."""
    _, memory, core, xy, photos = _inverted_scene()
    core.reset_agents(np.arange(3), np.arange(3), np.full((3, 2), 96.0))
    assert found(core.ep_cands, xy).all()
    np.testing.assert_allclose(core.cand_sims, memory.matcher.query(photos, 2)[1], rtol=1e-6)
    assert (core.cand_sims[:, 0] > 0.5).all() and (core.cand_sims[:, 0] >= core.cand_sims[:, 1]).all()


@pytest.mark.parametrize("headings, turn", [(1, 0.0), (4, 90.0), (8, 45.0)])
def test_a_photo_scores_at_its_best_candidate_what_the_matcher_gave(
    world: tuple[np.ndarray, np.ndarray], headings: int, turn: float
) -> None:
    rgb, ok = world
    xy = places(4, seed=5)
    photos = np.stack([rotate(p, turn) for p in crop_views(rgb, xy[:, 0], xy[:, 1], V)])
    matcher = OrientationMatcher(rgb, ok, V, 16.0, headings=headings)
    pos, scores = matcher.query(photos, 3)
    for photo, (x, y), best, far in zip(photos, pos[:, 0], scores[:, 0], xy[::-1], strict=True):
        ref = matcher.reference(photo)
        assert matcher.score(ref, x, y) == pytest.approx(best, abs=1e-9)
        assert matcher.score(ref, x + 3, y) < best - 0.05  # it falls off the exact place
        assert matcher.score(ref, *far) < best - 0.3  # another target's place does not match
        assert matcher.reference(photo) is ref  # remembered


def test_with_pixel_candidates_the_own_similarity_is_verified_in_pixels() -> None:
    """0 at the photo's best match, clearly negative away from it, and the own stop rule (not the encoder's
    threshold) fires there."""
    from maprl.nav.core import PIXEL_STOP_MARGIN

    scene, memory, core, xy, photos = _inverted_scene()
    assert core.cfg.stop_threshold == -PIXEL_STOP_MARGIN
    cands, _ = memory.matcher.query(photos, 2)
    core.reset_agents(np.arange(3), np.arange(3), cands[:, 0])
    np.testing.assert_allclose(core.sim, 0.0, atol=1e-6)
    core.reset_agents(np.arange(3), np.arange(3), xy[[1, 2, 0]])  # each agent at another target's place
    assert (core.sim < -0.2).all()


@pytest.mark.parametrize("decoy", [False, True])
def test_the_scripted_search_stops_at_the_place_the_pixels_confirm(decoy: bool) -> None:
    """Moving on through the candidates: a decoy first in the list is passed by (its view does not match the
    photo), and the own stop rule ends the episode at the true place."""
    scene, memory, core, xy, photos = _inverted_scene()
    far = np.array([[20.0, 170.0], [170.0, 20.0], [20.0, 20.0]])
    core.reset_agents(np.arange(3), np.arange(3), np.full((3, 2), 96.0), far if decoy else None)
    done = np.zeros(3, bool)
    for _ in range(60):
        _, terminated, _ = core.step(np.where(done, 2, 3))  # 3 = move on; stopped agents refine in place
        done |= terminated
        if done.all():
            break
    assert done.all() and (core.distance() <= 2.0).all()


def test_the_scripted_search_baseline_stops_on_the_first_right_candidate_with_pixel_candidates() -> None:
    """Flying with continuous actions, a step often ends within the visited radius of a candidate but off
    it, where a pixel-verified similarity is far below its peak: the scripted search must fly on to the
    candidate itself, so that without decoys it stops where retrieve-then-fly does, on the same path."""
    from maprl.eval.baselines import RetrieveThenFly
    from maprl.eval.episodes import evaluate_methods, make_episodes

    scene, memory, core, _, _ = _inverted_scene()
    cfg = dataclasses.replace(core.cfg, env=core.cfg.env.model_copy(update={"actions": "continuous"}))
    cfg = dataclasses.replace(cfg, stop_threshold=0.98, success_radius=16.0)  # visited within 8 px
    episodes = make_episodes(scene, "test", 24, seed=1)
    methods = {"fly": RetrieveThenFly, "search": lambda: RetrieveThenFly(search=True)}
    df, _ = evaluate_methods(scene, memory, cfg, methods, episodes, record_paths=False)
    by = {m: d.reset_index(drop=True) for m, d in df.groupby("method")}
    assert by["fly"]["success"].all() and by["fly"]["stopped"].all()
    pd.testing.assert_series_equal(by["search"]["path_length_px"], by["fly"]["path_length_px"])
    assert by["search"]["stopped"].all()


def test_params_choose_the_retriever_and_reject_others() -> None:
    from maprl.config import ParamsError, parse_params

    assert tiny_params(agent={"retriever": "orientation"}).agent.retriever == "orientation"
    with pytest.raises(ParamsError, match="agent.retriever"):
        parse_params({"agent": {"retriever": "sift"}})
