// Calls the Mercato gateway from Java, with stubs that protoc and grpc-java generate from
// protos/ (docs/api.md shows this file as is; tests/api/test_java_example.py compiles it).
import com.google.protobuf.Timestamp;
import io.grpc.Grpc;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import java.io.File;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import mercato.v1.Common.Event;
import mercato.v1.Common.EventType;
import mercato.v1.Common.RelationKind;
import mercato.v1.Gateway.GetRelatedItemsRequest;
import mercato.v1.Gateway.GetRelatedItemsResponse;
import mercato.v1.Gateway.RecommendRequest;
import mercato.v1.Gateway.RecommendResponse;
import mercato.v1.Gateway.RecommendedItem;
import mercato.v1.Gateway.TrackEventsRequest;
import mercato.v1.Gateway.TrackEventsResponse;
import mercato.v1.GatewayServiceGrpc;
import mercato.v1.GatewayServiceGrpc.GatewayServiceBlockingStub;

public final class GatewayExample {
  static final Metadata.Key<String> API_KEY =
      Metadata.Key.of("x-api-key", Metadata.ASCII_STRING_MARSHALLER);
  static final Metadata.Key<String> REQUEST_ID =
      Metadata.Key.of("x-request-id", Metadata.ASCII_STRING_MARSHALLER);

  public static void main(String[] args) throws Exception {
    String target = args.length > 0 ? args[0] : "127.0.0.1:50051";
    String apiKey = args.length > 1 ? args[1] : "";
    // TLS: trust the CA that signed the gateway's certificate (args[2]), else plaintext.
    ManagedChannel channel =
        args.length > 2
            ? Grpc.newChannelBuilder(
                    target, TlsChannelCredentials.newBuilder().trustManager(new File(args[2])).build())
                .build()
            : ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    Metadata headers = new Metadata();
    headers.put(API_KEY, apiKey);
    AtomicReference<Metadata> trailers = new AtomicReference<>();
    GatewayServiceBlockingStub gateway =
        GatewayServiceGrpc.newBlockingStub(channel)
            .withInterceptors(
                MetadataUtils.newAttachHeadersInterceptor(headers),
                MetadataUtils.newCaptureMetadataInterceptor(new AtomicReference<>(), trailers));
    try {
      RecommendResponse resp =
          gateway
              .withDeadlineAfter(2, TimeUnit.SECONDS)
              .recommend(RecommendRequest.newBuilder().setCustomerId("customer-42").setK(5).build());
      for (RecommendedItem rec : resp.getItemsList()) {
        System.out.printf(
            "%d %s %s%n", rec.getRank(), rec.getItem().getItemId(), rec.getReasonsList());
      }
      System.out.println("request id " + trailers.get().get(REQUEST_ID));
      if (resp.hasShortfall()) {
        System.out.println("short list: " + resp.getShortfall().getReason());
      }

      GetRelatedItemsResponse related =
          gateway
              .withDeadlineAfter(2, TimeUnit.SECONDS)
              .getRelatedItems(
                  GetRelatedItemsRequest.newBuilder()
                      .setItemId(resp.getItems(0).getItem().getItemId())
                      .setKind(RelationKind.RELATION_KIND_COMPLEMENT)
                      .setK(4)
                      .build());
      related.getDegradedList().forEach(d -> System.out.println(d.getStage() + " -> " + d.getFallback()));

      long ms = System.currentTimeMillis();
      Timestamp now =
          Timestamp.newBuilder().setSeconds(ms / 1000).setNanos((int) (ms % 1000) * 1_000_000).build();
      TrackEventsResponse tracked =
          gateway
              .withDeadlineAfter(2, TimeUnit.SECONDS)
              .trackEvents(
                  TrackEventsRequest.newBuilder()
                      .addEvents(
                          Event.newBuilder()
                              .setEventId(java.util.UUID.randomUUID().toString())
                              .setCustomerId("customer-42")
                              .setType(EventType.EVENT_TYPE_VIEW)
                              .setItemId(resp.getItems(0).getItem().getItemId())
                              .setTimestamp(now))
                      .build());
      System.out.println("accepted " + tracked.getAccepted());
    } catch (StatusRuntimeException e) {
      Metadata t = Status.trailersFromThrowable(e);
      System.err.printf(
          "%s: %s (request id %s)%n",
          e.getStatus().getCode(), e.getStatus().getDescription(), t == null ? "" : t.get(REQUEST_ID));
    } finally {
      channel.shutdown().awaitTermination(5, TimeUnit.SECONDS);
    }
  }
}
