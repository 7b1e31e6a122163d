// The gateway as a Node.js shop backend meets it: every public method, request ids on
// success and on error, bad-input status codes, enum names and snake_case fields, and
// server reflection v1. Run by tests/e2e/test_node_client.py against the real services
// serving a trained tiny shop; by hand:
//   MERCATO_GATEWAY_TARGET=127.0.0.1:50051 MERCATO_API_KEY=... node --test tests/node/
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

import { call, gatewayClient, loadMercato, now } from './mercato.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const TARGET = process.env.MERCATO_GATEWAY_TARGET ?? '127.0.0.1:50051';
const API_KEY = process.env.MERCATO_API_KEY ?? '';
const PROTO_ROOT = process.env.MERCATO_PROTO_ROOT ?? path.join(here, '..', '..', 'protos');

const mercato = loadMercato(PROTO_ROOT);
let client;
const opts = { apiKey: API_KEY };

before(() => {
  client = gatewayClient(mercato, TARGET);
});
after(() => client.close());

async function rejects(promise, code) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.code, code, `${grpc.status[err.code]}: ${err.details}`);
    assert.ok(err.details.length > 0);
    assert.match(err.requestId ?? '', /\S/, 'request id in the trailing metadata');
    return err;
  }
  assert.fail(`expected ${grpc.status[code]}`);
}

async function anchors(n) {
  const { response } = await call(client, 'Recommend', { k: n }, opts);
  return response.items.map((r) => r.item.item_id);
}

describe('Recommend', () => {
  test('answers k ranked items with names, reasons, models and the request id', async () => {
    const { response, requestId } = await call(client, 'Recommend', { k: 5 }, opts);
    assert.equal(response.items.length, 5);
    assert.deepEqual(
      response.items.map((r) => r.rank),
      [1, 2, 3, 4, 5],
    );
    for (const r of response.items) {
      assert.match(r.item.item_id, /\S/);
      assert.equal(typeof r.item.stock, 'string'); // int64 with longs: String
      assert.ok(r.reasons.length > 0 && r.reasons.every((x) => x.startsWith('REASON_')));
    }
    assert.equal(requestId, response.request_id);
    const models = response.models.map((m) => m.name);
    assert.ok(models.includes('mercato-two-tower') && models.includes('mercato-ranker'), models);
    assert.deepEqual(response.degraded, []);
    assert.equal(response.shortfall, null); // a full list
  });

  test('keeps the caller request id', async () => {
    const sent = `node-${randomUUID()}`;
    const { response, requestId } = await call(
      client,
      'Recommend',
      { k: 2 },
      { ...opts, requestId: sent },
    );
    assert.equal(response.request_id, sent);
    assert.equal(requestId, sent);
  });

  test('a short list says why', async () => {
    const { response: full } = await call(client, 'Recommend', { k: 3 }, opts);
    const category = full.items[0].item.category;
    const { response } = await call(
      client,
      'Recommend',
      { k: 100, categories: [category] },
      opts,
    );
    assert.ok(response.items.length > 0 && response.items.length < 100);
    assert.equal(response.shortfall.requested, 100);
    assert.equal(response.shortfall.returned, response.items.length);
    assert.match(response.shortfall.reason, /of 100 items/);
  });

  test('debug stages come in pipeline order', async () => {
    const { response } = await call(
      client,
      'Recommend',
      {
        customer_id: `node-${randomUUID()}`,
        k: 3,
        include_offer: true,
        debug: true,
        context: { surface: 'SURFACE_CHECKOUT', timestamp: now() },
      },
      opts,
    );
    assert.deepEqual(
      response.debug.stages.map((s) => s.stage),
      ['profile', 'retrieval', 'details', 'ranking', 'offer'],
    );
  });

  test('bad input: k out of range, no API key', async () => {
    await rejects(call(client, 'Recommend', { k: 1000 }, opts), grpc.status.INVALID_ARGUMENT);
    await rejects(call(client, 'Recommend', { k: 3 }, {}), grpc.status.UNAUTHENTICATED);
    await rejects(
      call(client, 'Recommend', { k: 3 }, { apiKey: 'not-a-key' }),
      grpc.status.UNAUTHENTICATED,
    );
  });
});

describe('GetRelatedItems', () => {
  test('similar items of an anchor', async () => {
    const [anchor] = await anchors(1);
    const { response, requestId } = await call(
      client,
      'GetRelatedItems',
      { item_id: anchor, kind: 'RELATION_KIND_SIMILAR', k: 4 },
      opts,
    );
    assert.equal(requestId, response.request_id);
    assert.equal(response.items.length, 4);
    assert.ok(response.items.every((r) => r.item.item_id !== anchor));
    assert.ok(response.items.every((r) => r.reasons[0] === 'REASON_SIMILAR'));
  });

  test('complements name the similar-items fallback when they use it', async () => {
    let filled = 0;
    for (const anchor of await anchors(30)) {
      const { response } = await call(
        client,
        'GetRelatedItems',
        { item_id: anchor, kind: 'RELATION_KIND_COMPLEMENT', k: 8 },
        opts,
      );
      const similar = response.items.some((r) => r.reasons.includes('REASON_SIMILAR'));
      const named = response.degraded.some(
        (d) => d.stage === 'retrieval' && d.fallback === 'similar_items',
      );
      assert.equal(named, similar, JSON.stringify(response.degraded));
      if (similar) filled += 1;
    }
    assert.ok(filled > 0, 'the tiny shop has anchors without enough basket complements');
  });

  test('bad input: kind missing or misspelled, unknown item', async () => {
    const [anchor] = await anchors(1);
    await rejects(
      call(client, 'GetRelatedItems', { item_id: anchor, k: 3 }, opts),
      grpc.status.INVALID_ARGUMENT,
    );
    // An enum name that does not exist encodes as 0: rejected, not answered as SIMILAR.
    await rejects(
      call(client, 'GetRelatedItems', { item_id: anchor, kind: 'RELATION_KIND_SIMILIAR' }, opts),
      grpc.status.INVALID_ARGUMENT,
    );
    await rejects(
      call(client, 'GetRelatedItems', { item_id: 'no-such-item', kind: 'RELATION_KIND_SIMILAR' }, opts),
      grpc.status.NOT_FOUND,
    );
    await rejects(
      call(client, 'GetRelatedItems', { kind: 'RELATION_KIND_SIMILAR' }, opts),
      grpc.status.INVALID_ARGUMENT,
    );
  });
});

describe('TrackEvents and GetCartRecommendations', () => {
  test('events fill a cart; the cart gets complements and an offer decision', async () => {
    const customer = `node-${randomUUID()}`;
    const items = await anchors(2);
    const events = items.map((item, i) => ({
      event_id: `${customer}-${i}`,
      customer_id: customer,
      type: 'EVENT_TYPE_ADD_TO_CART',
      item_id: item,
      quantity: 1,
      timestamp: now(),
    }));
    const { response: tracked, requestId } = await call(client, 'TrackEvents', { events }, opts);
    assert.equal(tracked.accepted, 2);
    assert.equal(tracked.request_id, requestId);
    const { response: again } = await call(client, 'TrackEvents', { events }, opts);
    assert.equal(again.duplicates, 2); // idempotent by event id: safe to retry

    const { response: cart } = await call(
      client,
      'GetCartRecommendations',
      { customer_id: customer, k: 4, include_offer: true },
      opts,
    );
    assert.deepEqual(cart.cart.lines.map((l) => l.item_id).sort(), [...items].sort());
    const updated = cart.cart.updated_at; // google.protobuf.Timestamp
    assert.equal(typeof updated.seconds, 'string');
    assert.equal(typeof updated.nanos, 'number');
    assert.ok(Math.abs(Number(updated.seconds) - Date.now() / 1000) < 600);
    assert.ok(cart.items.length > 0);
    assert.ok(cart.items.every((r) => !items.includes(r.item.item_id)));
    assert.ok(!cart.degraded.some((d) => d.fallback === 'personalized_items'));
    assert.match(cart.offer_reason, /\S/);
    if (cart.offer === null) {
      assert.equal(cart.offer_expected_incremental_margin, 0);
    } else {
      assert.notEqual(cart.offer.kind, 'OFFER_KIND_NONE');
      if (cart.offer_reason !== 'exploration') {
        assert.ok(cart.offer_expected_incremental_margin >= 0);
      }
    }
  });

  test('an empty cart names its fallback', async () => {
    const { response } = await call(
      client,
      'GetCartRecommendations',
      { customer_id: `node-${randomUUID()}`, k: 3 },
      opts,
    );
    assert.equal(response.items.length, 3);
    assert.ok(response.degraded.some((d) => d.fallback === 'personalized_items'));
  });

  test('bad input: no events, event without type, cart without customer', async () => {
    await rejects(call(client, 'TrackEvents', { events: [] }, opts), grpc.status.INVALID_ARGUMENT);
    const [item] = await anchors(1);
    await rejects(
      call(
        client,
        'TrackEvents',
        { events: [{ event_id: randomUUID(), customer_id: 'c', item_id: item, timestamp: now() }] },
        opts,
      ),
      grpc.status.INVALID_ARGUMENT,
    );
    await rejects(
      call(client, 'GetCartRecommendations', { k: 3 }, opts),
      grpc.status.INVALID_ARGUMENT,
    );
  });
});

describe('server reflection v1', () => {
  test('lists the gateway and describes it', async () => {
    const def = protoLoader.loadSync('grpc/reflection/v1/reflection.proto', {
      includeDirs: [path.join(here, 'proto')],
      keepCase: true,
      oneofs: true,
    });
    const { ServerReflection } = grpc.loadPackageDefinition(def).grpc.reflection.v1;
    const reflection = new ServerReflection(TARGET, grpc.credentials.createInsecure());
    try {
      const answers = await new Promise((resolve, reject) => {
        const out = [];
        const stream = reflection.ServerReflectionInfo({ deadline: Date.now() + 5000 });
        stream.on('data', (r) => out.push(r));
        stream.on('error', reject);
        stream.on('end', () => resolve(out));
        stream.write({ list_services: '' });
        stream.write({ file_containing_symbol: 'mercato.v1.GatewayService' });
        stream.end();
      });
      assert.equal(answers.length, 2);
      const names = answers[0].list_services_response.service.map((s) => s.name);
      assert.ok(names.includes('mercato.v1.GatewayService'), names);
      assert.ok(names.includes('grpc.reflection.v1.ServerReflection'), names);
      assert.ok(answers[1].file_descriptor_response.file_descriptor_proto.length > 0);
    } finally {
      reflection.close();
    }
  });
});
