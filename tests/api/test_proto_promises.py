"""Every promise in the protos' comments is checked by a test, so the contract and the
code cannot drift apart unnoticed.

The comments of every element of protos/mercato/v1 are read from protoc's source info
(tests/api/protoscan.py); a comment is a promise when it says something a caller may rely
on ("rejected with", "unset when", "at most", "Required", "NOT_FOUND", "idempotent", ...).
``PROMISES`` maps each such element to the tests that check it. This test fails when:

- a comment makes a promise that is not in the map (write or name its test, then add it);
- a mapped test does not exist (renamed or deleted);
- the map names an element whose comment no longer promises anything (remove it).
"""

from __future__ import annotations

import ast
from functools import cache

from tests.api.protoscan import comments, promises
from tests.procs import REPO

C = "tests/e2e/test_api_contract.py::"
NODE = "tests/e2e/test_node_client.py::test_node_client_against_the_real_gateway"
PROFILE_SVC = "tests/profile/test_service.py::"
PROFILE_PROMISES = "tests/api/test_profile_promises.py::"
OFFERS = "tests/ranking/test_offers.py::"
RANK_PIPE = "tests/ranking/test_pipeline.py::"
RETRIEVAL = "tests/retrieval/test_service.py::"

PROMISES: dict[str, list[str]] = {
    # common.proto
    "common.proto:package": ["tests/api/test_proto_promises.py::test_ids_in_the_api_are_strings"],
    "common.proto:EventType.EVENT_TYPE_UNSPECIFIED": [
        "tests/profile/test_logic.py::test_validation_rejects",
        "tests/gateway/test_gateway_degraded.py::test_track_events_forwarded_and_validated",
        NODE,
    ],
    "common.proto:CandidateColumns.by_source": [
        "tests/ranking/test_columns.py::test_bad_columns_say_what_is_wrong",
        "tests/retrieval/test_merge.py::test_columns_carry_the_same_candidates",
    ],
    "common.proto:Item.item_id": [PROFILE_PROMISES + "test_catalog_items_are_checked"],
    "common.proto:Item.price": [
        PROFILE_PROMISES + "test_catalog_items_are_checked",
        PROFILE_SVC + "test_other_bad_requests",
    ],
    "common.proto:Item.stock": [
        PROFILE_PROMISES + "test_catalog_items_are_checked",
        "tests/gateway/test_gateway_degraded.py::test_recommend_degrades_to_trending_with_rules",
        "tests/ranking/test_rules.py::test_rules_hold_for_any_input",
        C + "test_a_short_list_says_why",
    ],
    "common.proto:Event": [
        "tests/profile/test_store.py::test_events_are_idempotent_and_state_matches_log",
        "tests/gateway/test_gateway_degraded.py::test_track_events_forwarded_and_validated",
    ],
    "common.proto:Event.event_id": ["tests/profile/test_logic.py::test_validation_rejects"],
    "common.proto:Event.customer_id": ["tests/profile/test_logic.py::test_validation_rejects"],
    "common.proto:Event.type": ["tests/profile/test_logic.py::test_validation_rejects", NODE],
    "common.proto:Event.item_id": [
        "tests/profile/test_logic.py::test_validation_rejects",
        "tests/profile/test_logic.py::test_offer_events_need_offer_id_and_unknown_items_are_errors",
    ],
    "common.proto:Event.quantity": ["tests/profile/test_logic.py::test_validation_rejects"],
    "common.proto:Event.price": ["tests/profile/test_logic.py::test_validation_rejects"],
    "common.proto:Event.timestamp": ["tests/profile/test_logic.py::test_validation_rejects"],
    "common.proto:RelationKind.RELATION_KIND_UNSPECIFIED": [
        C + "test_related_items_kind_is_required",
        RETRIEVAL + "test_bad_input_is_invalid_argument",
        NODE,
    ],
    "common.proto:RelationKind.RELATION_KIND_COMPLEMENT": [
        C + "test_complements_that_fall_back_to_similar_items_say_so",
        C + "test_cart_recommendations_name_their_fallbacks",
        NODE,
    ],
    # diagnostics.proto
    "diagnostics.proto:EchoRequest.delay_ms": [
        "tests/runtime/test_service_processes.py::test_service_process_lifecycle"
    ],
    # gateway.proto
    "gateway.proto:GatewayService": [
        "tests/gateway/test_gateway_degraded.py::test_everything_down_still_answers",
        "tests/e2e/test_end_to_end.py::test_kill_a_downstream_mid_load",
    ],
    "gateway.proto:GatewayService.GetCartRecommendations": [
        C + "test_cart_recommendations_name_their_fallbacks",
        NODE,
    ],
    "gateway.proto:GatewayService.TrackEvents": [
        "tests/gateway/test_gateway_degraded.py::test_track_events_forwarded_and_validated",
        NODE,
    ],
    "gateway.proto:DebugInfo.stages": [
        C + "test_debug_stages_are_in_pipeline_order",
        "tests/gateway/test_gateway_degraded.py::test_recommend_degrades_to_trending_with_rules",
        NODE,
    ],
    "gateway.proto:RecommendResponse.offer": [
        C + "test_offer_is_unset_unless_the_policy_chose_an_incentive"
    ],
    "gateway.proto:RecommendResponse.offer_decision_id": [
        C + "test_offer_is_unset_unless_the_policy_chose_an_incentive"
    ],
    "gateway.proto:RecommendResponse.shortfall": [C + "test_a_short_list_says_why", NODE],
    "gateway.proto:RecommendRequest.categories": [
        C + "test_list_fields_past_their_bounds_are_invalid_argument"
    ],
    "gateway.proto:RecommendRequest.exclude_item_ids": [
        C + "test_list_fields_past_their_bounds_are_invalid_argument"
    ],
    "gateway.proto:TrackEventsRequest.events": [
        C + "test_list_fields_past_their_bounds_are_invalid_argument"
    ],
    "common.proto:Context.cart_item_ids": [
        C + "test_list_fields_past_their_bounds_are_invalid_argument"
    ],
    "gateway.proto:GetRelatedItemsRequest.item_id": [
        C + "test_unknown_item_is_not_found",
        "tests/gateway/test_gateway_degraded.py::test_anonymous_and_validation",
        NODE,
    ],
    "gateway.proto:GetRelatedItemsRequest.kind": [C + "test_related_items_kind_is_required", NODE],
    "gateway.proto:GetRelatedItemsResponse.shortfall": [C + "test_a_short_list_says_why"],
    "gateway.proto:GetCartRecommendationsRequest.customer_id": [NODE],
    "gateway.proto:GetCartRecommendationsResponse.offer": [
        C + "test_offer_is_unset_unless_the_policy_chose_an_incentive",
        NODE,
    ],
    "gateway.proto:GetCartRecommendationsResponse.offer_decision_id": [
        C + "test_offer_is_unset_unless_the_policy_chose_an_incentive"
    ],
    "gateway.proto:GetCartRecommendationsResponse.offer_expected_incremental_margin": [
        C + "test_offer_is_unset_unless_the_policy_chose_an_incentive",
        NODE,
    ],
    "gateway.proto:GetCartRecommendationsResponse.shortfall": [C + "test_a_short_list_says_why"],
    # profile.proto
    "profile.proto:ProfileService": [
        "tests/profile/test_faults.py::test_sigkill_mid_stream_sqlite",
        "tests/profile/test_store.py::test_events_are_idempotent_and_state_matches_log",
    ],
    "profile.proto:ProfileService.TrackEvents": [
        PROFILE_SVC + "test_bad_event_rejects_the_whole_batch",
        PROFILE_SVC + "test_partial_accept_reports_each_bad_event",
        "tests/profile/test_store.py::test_a_failing_batch_writes_nothing",
        "tests/profile/test_faults.py::test_redis_outage_unavailable_then_recovery",
    ],
    "profile.proto:ProfileService.GetProfile": [
        PROFILE_SVC + "test_unknown_customer_gets_an_empty_profile",
        "tests/profile/test_faults.py::test_redis_outage_unavailable_then_recovery",
    ],
    "profile.proto:ProfileService.ListItemChanges": [
        "tests/ranking/test_item_table.py::test_ranking_follows_the_catalogue_change_feed",
        "tests/profile/test_store.py::test_item_changes_follow_every_catalog_write",
    ],
    "profile.proto:ListItemChangesResponse.items": [
        "tests/profile/test_store.py::test_item_changes_follow_every_catalog_write",
    ],
    "profile.proto:GetProfileRequest.customer_id": [PROFILE_SVC + "test_other_bad_requests"],
    "profile.proto:Customer.customer_id": [PROFILE_PROMISES + "test_customer_ids_are_required"],
    "profile.proto:GetCartRequest.customer_id": [
        PROFILE_PROMISES + "test_customer_ids_are_required"
    ],
    "profile.proto:ListAbandonedCartsRequest.idle_seconds": [
        PROFILE_SVC + "test_other_bad_requests"
    ],
    # ranking.proto
    "ranking.proto:RankRequest.candidates": [
        RANK_PIPE + "test_bad_requests_say_what_is_wrong",
        RANK_PIPE + "test_duplicates_keep_the_best_score_and_its_source",
        RANK_PIPE + "test_duplicate_candidates_returned_once",
    ],
    "ranking.proto:RankRequest.columns": [
        "tests/ranking/test_columns.py::test_bad_columns_say_what_is_wrong",
        "tests/ranking/test_columns.py::test_candidates_and_columns_together_are_refused",
        "tests/ranking/test_columns.py::test_columns_merge_to_the_same_candidate_set",
        "tests/ranking/test_columns.py::test_rank_answers_the_same_from_columns",
    ],
    "ranking.proto:RankRequest.items": [
        RANK_PIPE + "test_missing_item_details_mean_unknown_stock",
        "tests/ranking/test_rules.py::test_rules_hold_for_any_input",
    ],
    "ranking.proto:RankResponse.items": [
        "tests/ranking/test_rules.py::test_rules_hold_for_any_input"
    ],
    "ranking.proto:SelectOfferRequest.offer_ids": [
        OFFERS + "test_eligibility_restrictions_and_previews",
        "tests/ranking/test_service.py::test_bad_input_gets_clear_statuses_and_the_service_keeps_running",
    ],
    "ranking.proto:OfferOutcome.OFFER_OUTCOME_UNSPECIFIED": [
        OFFERS + "test_outcomes_are_idempotent_and_checked"
    ],
    "ranking.proto:RecordOfferOutcomeRequest.decision_id": [
        OFFERS + "test_outcomes_are_idempotent_and_checked"
    ],
    "ranking.proto:RecordOfferOutcomeResponse.recorded": [
        OFFERS + "test_outcomes_are_idempotent_and_checked"
    ],
    # retrieval.proto
    "retrieval.proto:RetrievalService.Retrieve": [
        RETRIEVAL + "test_not_serving_until_a_model_is_promoted_then_per_request_alias"
    ],
    "retrieval.proto:RetrieveResponse.candidates": [
        RETRIEVAL + "test_retrieve_equals_brute_force_over_exported_embeddings"
    ],
    "retrieval.proto:RetrieveRelatedRequest.item_ids": [
        RETRIEVAL + "test_unknown_anchor_items_are_not_found",
        RETRIEVAL + "test_related_items",
        C + "test_unknown_item_is_not_found",
    ],
}


@cache
def _tests_in(path: str) -> frozenset[str]:
    tree = ast.parse((REPO / path).read_text())
    return frozenset(
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    )


def test_every_promise_in_the_protos_is_mapped_to_a_test() -> None:
    found = promises()
    assert len(found) >= 40, "the scan found too few promises: is protoc's source info read?"
    unmapped = {k: v for k, v in found.items() if k not in PROMISES}
    assert not unmapped, "promises without a test (add them to PROMISES):\n" + "\n".join(
        f"  {k}: {v}" for k, v in unmapped.items()
    )
    stale = sorted(set(PROMISES) - set(found))
    assert not stale, f"mapped elements whose comment promises nothing (any more): {stale}"


def test_every_mapped_test_exists() -> None:
    missing = []
    for key, tests in PROMISES.items():
        assert tests, key
        for test_id in tests:
            path, _, name = test_id.partition("::")
            if not (REPO / path).is_file() or name.split("[")[0] not in _tests_in(path):
                missing.append(f"{key} -> {test_id}")
    assert not missing, "mapped tests that do not exist:\n" + "\n".join(missing)


def test_the_scan_sees_the_comments_it_should() -> None:
    """The scanner itself: it reads field, enum value, method and nested comments."""
    all_comments = comments()
    assert "Required" in all_comments["gateway.proto:GetRelatedItemsRequest.item_id"]
    assert "rejected" in all_comments["common.proto:RelationKind.RELATION_KIND_UNSPECIFIED"]
    assert "GatewayService.Recommend" in " ".join(all_comments)


def test_ids_in_the_api_are_strings() -> None:
    """common.proto: items and customers are named by the retailer's string ids; internal
    integer ids (embedding rows, FAISS ids) never appear: every *_id(s) field is a string."""
    import importlib

    from google.protobuf.descriptor import FieldDescriptor

    checked = 0
    for mod in ("common", "gateway", "profile", "retrieval", "ranking", "diagnostics"):
        fd = importlib.import_module(f"mercato.v1.{mod}_pb2").DESCRIPTOR
        stack = list(fd.message_types_by_name.values())
        while stack:
            msg = stack.pop()
            stack += list(msg.nested_types)
            for f in msg.fields:
                if f.name.endswith(("_id", "_ids")) and f.message_type is None:
                    checked += 1
                    assert f.type == FieldDescriptor.TYPE_STRING, f"{msg.full_name}.{f.name}"
    assert checked > 20
