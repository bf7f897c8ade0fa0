//! The gRPC API with real tonic clients: unary and streaming answers equal the HTTP ones, an
//! invalid request is INVALID_ARGUMENT, health is SERVING once ready and NOT_SERVING while
//! draining, reflection lists the service.

mod common;

use common::http::*;
use futures::StreamExt;
use ocellus::api::grpc::pb;
use ocellus::api::grpc::pb::ocellus_client::OcellusClient;
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn wide_request(max_tokens: i64) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: MODEL.into(),
        messages: vec![pb::Message {
            role: "user".into(),
            content: vec![
                pb::ContentPart {
                    part: Some(pb::content_part::Part::ImageUrl(pb::ImageUrl {
                        url: fixture_image_uri("wide"),
                        detail: String::new(),
                    })),
                },
                pb::ContentPart {
                    part: Some(pb::content_part::Part::Text("What is in this picture?".into())),
                },
            ],
        }],
        sampling: Some(pb::SamplingOptions {
            max_tokens: Some(max_tokens),
            min_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..Default::default()
        }),
    }
}

/// Waits on grpc.health.v1's Watch stream (an event, not a poll) for `want`.
async fn health_becomes(health: &mut HealthClient<tonic::transport::Channel>, service: &str, want: ServingStatus) {
    let request = tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    };
    let mut watch = health.watch(request).await.unwrap().into_inner();
    while let Some(status) = watch.next().await {
        if status.unwrap().status == want as i32 {
            return;
        }
    }
    panic!("the health stream ended before {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_answers_as_http_does_and_reports_health() {
    let server = server(|args| args.grpc_port = Some(0)).await;
    let endpoint = format!("http://{}", server.grpc_addr.expect("gRPC is on"));
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = OcellusClient::new(channel.clone());
    let mut health = HealthClient::new(channel.clone());
    health_becomes(&mut health, "", ServingStatus::Serving).await;
    health_becomes(&mut health, "ocellus.v1.Ocellus", ServingStatus::Serving).await;

    // The same request over HTTP.
    let http = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": fixture_image_uri("wide")}},
            {"type": "text", "text": "What is in this picture?"}
        ]}],
        "max_tokens": 24, "min_tokens": 24, "temperature": 0,
    });
    let (status, body) = post(&reqwest::Client::new(), &url(&server, "/v1/chat/completions"), &http).await;
    assert_eq!(status, 200, "{body}");
    let expected = body["choices"][0]["message"]["content"].as_str().unwrap().to_string();

    let unary = client.generate(wide_request(24)).await.unwrap().into_inner();
    assert_eq!(unary.choices[0].text, expected);
    assert_eq!(unary.choices[0].finish_reason, "length");
    let usage = unary.usage.unwrap();
    assert_eq!(
        usage.prompt_tokens as u64,
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(usage.completion_tokens, 24);

    let mut stream = client.generate_stream(wide_request(24)).await.unwrap().into_inner();
    let (mut text, mut finish, mut last_usage) = (String::new(), String::new(), None);
    while let Some(message) = stream.next().await {
        let message = message.unwrap();
        text.push_str(&message.text);
        if !message.finish_reason.is_empty() {
            finish = message.finish_reason;
        }
        last_usage = message.usage.or(last_usage);
    }
    assert_eq!((text.as_str(), finish.as_str()), (expected.as_str(), "length"));
    assert_eq!(last_usage.unwrap().completion_tokens, 24);

    let mut invalid = wide_request(8);
    invalid.sampling.as_mut().unwrap().temperature = Some(3.0);
    let err = client.generate(invalid).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("temperature"), "{err}");
    let mut unknown = wide_request(8);
    unknown.model = "gpt-4o".into();
    assert_eq!(
        client.generate(unknown).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let models = client.list_models(pb::ListModelsRequest {}).await.unwrap().into_inner();
    assert_eq!(models.models[0].id, MODEL);

    let mut reflection = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    let answer = format!("{:?}", answers.next().await.unwrap().unwrap());
    assert!(answer.contains("ocellus.v1.Ocellus"), "{answer}");

    // Draining: health turns NOT_SERVING while a running stream still finishes.
    let mut running = client.generate_stream(wide_request(64)).await.unwrap().into_inner();
    let first = running.next().await.unwrap().unwrap();
    server.shutdown();
    health_becomes(&mut health, "", ServingStatus::NotServing).await;
    let mut tokens = usize::from(!first.text.is_empty() || first.finish_reason.is_empty());
    let mut usage = None;
    while let Some(message) = running.next().await {
        let message = message.unwrap();
        tokens += usize::from(message.usage.is_none() && message.finish_reason.is_empty());
        usage = message.usage.or(usage);
    }
    assert_eq!(usage.expect("the stream ran to its end").completion_tokens, 64);
    assert!(tokens > 0);
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_requires_the_api_key_when_one_is_set() {
    let server = server(|args| {
        args.grpc_port = Some(0);
        args.api_key = Some("sesame".into());
    })
    .await;
    let endpoint = format!("http://{}", server.grpc_addr.unwrap());
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = OcellusClient::new(channel);
    let err = client.list_models(pb::ListModelsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let mut request = tonic::Request::new(pb::ListModelsRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer wrong".parse().unwrap());
    assert_eq!(
        client.list_models(request).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let mut request = tonic::Request::new(pb::ListModelsRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer sesame".parse().unwrap());
    assert_eq!(
        client.list_models(request).await.unwrap().into_inner().models[0].id,
        MODEL
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_constrains_outputs_and_biases_logits_as_http_does() {
    let server = server(|args| args.grpc_port = Some(0)).await;
    let endpoint = format!("http://{}", server.grpc_addr.expect("gRPC is on"));
    let mut client = OcellusClient::connect(endpoint).await.unwrap();
    let sampled = |constraint| {
        let mut request = wide_request(30);
        let sampling = request.sampling.as_mut().unwrap();
        (sampling.temperature, sampling.min_tokens, sampling.seed) = (Some(1.0), None, Some(4));
        sampling.constraint = Some(constraint);
        request
    };
    use pb::sampling_options::Constraint;
    let answer = client
        .generate(sampled(Constraint::Regex("[0-9]{2}x[0-9]{2}".into())))
        .await
        .unwrap();
    let text = &answer.into_inner().choices[0].text;
    assert!(
        regex::Regex::new("^[0-9]{2}x[0-9]{2}$").unwrap().is_match(text),
        "{text:?}"
    );
    let choices = pb::Choices {
        choices: vec!["left".into(), "right".into()],
    };
    let answer = client.generate(sampled(Constraint::Choice(choices))).await.unwrap();
    assert!(["left", "right"].contains(&answer.into_inner().choices[0].text.as_str()));
    let schema = r#"{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#;
    let answer = client
        .generate(sampled(Constraint::JsonSchema(schema.into())))
        .await
        .unwrap();
    let value: serde_json::Value = serde_json::from_str(&answer.into_inner().choices[0].text).unwrap();
    assert!(value["ok"].is_boolean(), "{value}");

    let err = client
        .generate(sampled(Constraint::Regex("(unclosed".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    let mut biased = wide_request(3);
    biased.sampling.as_mut().unwrap().logit_bias = [(300, 100.0)].into();
    let answer = client.generate(biased).await.unwrap().into_inner();
    let expected = common::load_fixture_model(MODEL).processor.decode(&[300; 3]).unwrap();
    assert_eq!(answer.choices[0].text, expected);
    let mut out_of_range = wide_request(3);
    out_of_range.sampling.as_mut().unwrap().logit_bias = [(300, 101.0)].into();
    let err = client.generate(out_of_range).await.unwrap_err();
    assert!(err.message().contains("logit_bias"), "{err}");
}
