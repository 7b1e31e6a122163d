// A Mercato gateway client for Node.js: @grpc/grpc-js + @grpc/proto-loader, loading the
// API from the .proto files. docs/api.md shows this file as is, and tests/node runs it.
import grpc from '@grpc/grpc-js';
import protoLoader from '@grpc/proto-loader';

// The include root is the directory that holds `mercato/` (in this repository:
// protos/). Imports inside the protos are relative to it ("mercato/v1/common.proto").
export function loadMercato(protoRoot) {
  const definition = protoLoader.loadSync('mercato/v1/gateway.proto', {
    includeDirs: [protoRoot],
    keepCase: true, // item_id, not itemId: names as in the .proto and in the docs
    enums: String, // enum values as their names: 'REASON_COMPLEMENT'
    longs: String, // int64 (Item.stock, Timestamp.seconds) as decimal strings
    defaults: true, // unset scalars as '' / 0 / false, unset lists as []
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).mercato.v1;
}

// One client per process: it keeps one HTTP/2 connection and multiplexes calls on it.
// Pass grpc.credentials.createSsl(caPem) for a gateway behind TLS.
export function gatewayClient(mercato, target, credentials = grpc.credentials.createInsecure()) {
  return new mercato.GatewayService(target, credentials);
}

// Calls one method; resolves { response, requestId } or rejects with the gRPC error,
// which carries .code (grpc.status.*), .details and .requestId. The request id comes from
// the trailing metadata, which the gateway sends on success and on error alike.
export function call(client, method, request, { apiKey, requestId, timeoutMs = 2000 } = {}) {
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set('x-api-key', apiKey);
  if (requestId) metadata.set('x-request-id', requestId);
  return new Promise((resolve, reject) => {
    let outcome;
    const rpc = client[method](
      request,
      metadata,
      { deadline: Date.now() + timeoutMs },
      (err, response) => {
        outcome = { err, response };
      },
    );
    // 'status' follows the callback and carries the trailing metadata.
    rpc.on('status', (status) => {
      const id = status.metadata.get('x-request-id')[0];
      if (outcome.err) {
        outcome.err.requestId = id;
        reject(outcome.err);
      } else {
        resolve({ response: outcome.response, requestId: id });
      }
    });
  });
}

// A google.protobuf.Timestamp for "now": { seconds, nanos } (seconds is an int64: a string
// or a number both encode).
export function now() {
  const ms = Date.now();
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}
