//! Who may do what: tokens, roles, sender binding, submitted_by, safe defaults, TLS and
//! mTLS with certificates generated here, load shedding.

mod common;

use std::path::Path;

use audit_ledger::config::{ServerConfig, TlsFiles};
use audit_ledger::proto::compliance_service_client::ComplianceServiceClient;
use audit_ledger::proto::ledger_service_client::LedgerServiceClient;
use audit_ledger::proto::{
    AppendBatchRequest, AppendRequest, CheckSenderRequest, CheckSenderResponse, Fact,
    GetCheckpointRequest, GetEntryRequest, ListViolationsRequest, Party, PartyKind,
    RecordFactRequest, ResellerRelationship, Topic, fact, leaf_record,
};
use audit_ledger::server::Server;
use common::{Bearer, TestServer, communication, token_add};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

type Ledger = LedgerServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn channel(address: &str) -> Channel {
    Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn ledger_as(address: &str, token: Option<&str>) -> Ledger {
    LedgerServiceClient::with_interceptor(channel(address).await, Bearer(token.map(str::to_owned)))
}

struct Tokens {
    writer: String,
    bound: String,
    registrar: String,
    auditor: String,
    admin: String,
}

fn principals(dir: &Path) -> (std::path::PathBuf, Tokens) {
    let auth_file = dir.join("auth.toml");
    let tokens = Tokens {
        writer: token_add(&auth_file, "mail-gateway", "writer", None),
        bound: token_add(
            &auth_file,
            "contoso-gateway",
            "writer",
            Some("contoso-mail,contoso-billing"),
        ),
        registrar: token_add(&auth_file, "partner-center", "registrar", None),
        auditor: token_add(&auth_file, "compliance-tool", "auditor", None),
        admin: token_add(&auth_file, "ops", "admin", None),
    };
    (auth_file, tokens)
}

#[tokio::test]
async fn tokens_and_roles_decide_who_may_call_what() {
    let dir = tempfile::tempdir().unwrap();
    let (auth_file, tokens) = principals(dir.path());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&auth_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let stored = std::fs::read_to_string(&auth_file).unwrap();
    assert!(
        !stored.contains(&tokens.writer),
        "the auth file holds digests, not tokens"
    );

    let mut config = ServerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    config.auth_file = Some(auth_file);
    let server = TestServer::start_with(config).await;
    let address = server.address.clone();

    // No credentials, a wrong token, a malformed header: UNAUTHENTICATED.
    for token in [None, Some("alt_not-a-real-token")] {
        let status = ledger_as(&address, token)
            .await
            .get_checkpoint(GetCheckpointRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:?}");
    }

    // A writer appends but reads nothing.
    let mut writer = ledger_as(&address, Some(&tokens.writer)).await;
    let appended = writer
        .append(AppendRequest {
            communication: Some(communication("fabrikam-mail", 1)),
        })
        .await
        .unwrap()
        .into_inner();
    for status in [
        writer
            .get_entry(GetEntryRequest { index: 0 })
            .await
            .unwrap_err(),
        writer
            .get_checkpoint(GetCheckpointRequest::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied);
        assert!(
            status.message().contains("mail-gateway"),
            "{}",
            status.message()
        );
    }

    // An auditor reads but does not write.
    let mut auditor = ledger_as(&address, Some(&tokens.auditor)).await;
    let entry = auditor
        .get_entry(GetEntryRequest {
            index: appended.index,
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    // The ledger itself says which system recorded the communication.
    assert_eq!(entry.record.unwrap().submitted_by, "mail-gateway");
    let status = auditor
        .append(AppendRequest {
            communication: Some(communication("x", 2)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let mut compliance = ComplianceServiceClient::with_interceptor(
        channel(&address).await,
        Bearer(Some(tokens.auditor.clone())),
    );
    compliance
        .list_violations(ListViolationsRequest::default())
        .await
        .unwrap();

    // An admin does both.
    let mut admin = ledger_as(&address, Some(&tokens.admin)).await;
    admin
        .append(AppendRequest {
            communication: Some(communication("ops", 3)),
        })
        .await
        .unwrap();
    admin.get_entry(GetEntryRequest { index: 1 }).await.unwrap();

    // A writer bound to its senders cannot pose as another.
    let mut bound = ledger_as(&address, Some(&tokens.bound)).await;
    bound
        .append(AppendRequest {
            communication: Some(communication("contoso-billing", 4)),
        })
        .await
        .unwrap();
    let status = bound
        .append(AppendRequest {
            communication: Some(communication("fabrikam-mail", 5)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("communication.sender_id"),
        "{}",
        status.message()
    );
    let status = bound
        .append_batch(AppendBatchRequest {
            communications: vec![
                communication("contoso-mail", 6),
                communication("fabrikam-mail", 7),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().starts_with("communications[1].sender_id"),
        "{}",
        status.message()
    );
    let size = admin
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap()
        .size;
    assert_eq!(size, 3, "refused appends appended nothing");

    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&address).await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "audit.ledger.v1.LedgerService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    server.stop().await;
}

type Compliance =
    ComplianceServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

async fn compliance_as(address: &str, token: &str) -> Compliance {
    ComplianceServiceClient::with_interceptor(
        channel(address).await,
        Bearer(Some(token.to_owned())),
    )
}

fn fact(fact_id: &str, kind: fact::Kind) -> RecordFactRequest {
    RecordFactRequest {
        fact: Some(Fact {
            fact_id: fact_id.into(),
            effective_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            kind: Some(kind),
        }),
    }
}

fn party(party_id: &str, kind: PartyKind) -> fact::Kind {
    fact::Kind::Party(Party {
        party_id: party_id.into(),
        kind: kind as i32,
        display_name: String::new(),
    })
}

fn reseller(customer_id: &str, partner_id: &str, active: bool) -> fact::Kind {
    fact::Kind::ResellerRelationship(ResellerRelationship {
        customer_id: customer_id.into(),
        partner_id: partner_id.into(),
        active,
    })
}

/// Issue 16: facts decide every verdict, so a writer — even one bound to its own senders —
/// must not be able to end another partner's relationship or re-register it. Recording
/// facts is the registrar's right (and the admin's), and nothing else is.
#[tokio::test]
async fn facts_are_recorded_by_registrars_and_admins_never_by_writers() {
    let dir = tempfile::tempdir().unwrap();
    let (auth_file, tokens) = principals(dir.path());
    let mut config = ServerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    config.auth_file = Some(auth_file.clone());
    let server = TestServer::start_with(config).await;
    let address = server.address.clone();

    // Partner c resells to customer c, as recorded by the registrar.
    let mut registrar = compliance_as(&address, &tokens.registrar).await;
    registrar
        .record_fact(fact(
            "party-c",
            party("fabrikam", PartyKind::DirectBillPartner),
        ))
        .await
        .unwrap();
    registrar
        .record_fact(fact("rel-c", reseller("customer-c", "fabrikam", true)))
        .await
        .unwrap();
    let question = CheckSenderRequest {
        sender_id: "fabrikam".into(),
        customer_id: "customer-c".into(),
        topic: Topic::Commercial as i32,
        ..Default::default()
    };
    let verdict = |response: CheckSenderResponse| {
        let assessment = response.assessment.unwrap();
        (assessment.verdict, assessment.rule, assessment.tree_size)
    };
    let before = verdict(
        registrar
            .check_sender(question.clone())
            .await
            .unwrap()
            .into_inner(),
    );

    // The attack: a writer bound to other senders ends c's relationship and re-registers c;
    // an unbound writer tries the same. Both are refused, saying which role is needed.
    for (token, name) in [
        (&tokens.bound, "contoso-gateway"),
        (&tokens.writer, "mail-gateway"),
    ] {
        let mut writer = compliance_as(&address, token).await;
        for request in [
            fact("end-c", reseller("customer-c", "fabrikam", false)),
            fact(
                "party-c-again",
                party("fabrikam", PartyKind::IndirectReseller),
            ),
            fact(
                "party-own",
                party("contoso-mail", PartyKind::DirectBillPartner),
            ),
        ] {
            let status = writer.record_fact(request).await.unwrap_err();
            assert_eq!(status.code(), Code::PermissionDenied, "{name}: {status:?}");
            assert!(
                status.message().contains(name)
                    && status.message().contains("RecordFact")
                    && status.message().contains("registrar"),
                "{}",
                status.message()
            );
        }
        // A writer still asks before it sends.
        writer.check_sender(question.clone()).await.unwrap();
    }
    let after = verdict(
        registrar
            .check_sender(question.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(after, before, "the refused facts changed nothing");

    // A registrar records facts and asks CheckSender, and does nothing else.
    let status = ledger_as(&address, Some(&tokens.registrar))
        .await
        .append(AppendRequest {
            communication: Some(communication("fabrikam", 1)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("writer or admin"),
        "{}",
        status.message()
    );
    let status = ledger_as(&address, Some(&tokens.registrar))
        .await
        .get_entry(GetEntryRequest { index: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = registrar
        .list_violations(ListViolationsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // An admin keeps every right; what it records is attributed to it.
    let mut admin = compliance_as(&address, &tokens.admin).await;
    let recorded = admin
        .record_fact(fact("party-d", party("northwind", PartyKind::Vendor)))
        .await
        .unwrap()
        .into_inner();
    let entry = ledger_as(&address, Some(&tokens.admin))
        .await
        .get_entry(GetEntryRequest {
            index: recorded.index,
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(entry.record.unwrap().submitted_by, "ops");
    assert_eq!(recorded.index, 2, "nothing the writers sent was recorded");

    // A sender binding on a registrar would bind nothing: refused.
    let output = std::process::Command::new(common::binary())
        .args(["token", "add", "bound-registrar", "--role", "registrar"])
        .args(["--senders", "contoso-mail", "--auth-file"])
        .arg(&auth_file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("writers only"),
        "{output:?}"
    );
    drop((registrar, admin));
    server.stop().await;
}

#[tokio::test]
async fn unsafe_exposure_is_refused_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let any_address = "0.0.0.0:0".parse().unwrap();
    let config = ServerConfig::new(dir.path().join("a"), any_address);
    let error = Server::open(config.clone())
        .err()
        .expect("no auth on 0.0.0.0 is refused")
        .to_string();
    assert!(
        error.contains("--auth-file") && error.contains("--insecure"),
        "{error}"
    );

    let (auth_file, _) = principals(dir.path());
    let mut with_auth = config.clone();
    with_auth.auth_file = Some(auth_file);
    let error = Server::open(with_auth.clone())
        .err()
        .expect("tokens without TLS are refused")
        .to_string();
    assert!(error.contains("TLS"), "{error}");

    let mut insecure = with_auth;
    insecure.insecure = true;
    assert!(Server::open(insecure).is_ok());
}

/// TLS files are read and parsed when the server opens: a missing file or PEM that is no
/// key stops the start, naming the file, before the data dir is created or anything serves.
#[tokio::test]
async fn unreadable_or_invalid_tls_files_stop_the_start_before_anything_opens() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let cert = dir.path().join("server.pem");
    std::fs::write(&cert, &pki.server_cert).unwrap();
    let data = dir.path().join("data");
    let mut config = ServerConfig::new(data.clone(), "127.0.0.1:0".parse().unwrap());

    config.tls = Some(TlsFiles {
        cert: cert.clone(),
        key: dir.path().join("missing.key"),
        client_ca: None,
    });
    let error = Server::open(config.clone())
        .err()
        .expect("a missing key file is refused")
        .to_string();
    assert!(error.contains("missing.key"), "{error}");
    assert!(
        !data.exists(),
        "the data dir was created before the TLS files were read"
    );

    // A certificate where the key should be.
    config.tls = Some(TlsFiles {
        cert: cert.clone(),
        key: cert.clone(),
        client_ca: None,
    });
    let error = Server::open(config.clone())
        .err()
        .expect("a certificate is no private key")
        .to_string();
    assert!(error.contains("TLS") && error.contains("key"), "{error}");
    assert!(!data.exists());

    config.tls = Some(TlsFiles {
        cert: cert.clone(),
        key: {
            let key = dir.path().join("server.key");
            std::fs::write(&key, &pki.server_key).unwrap();
            key
        },
        client_ca: Some(dir.path().join("missing-ca.pem")),
    });
    let error = Server::open(config.clone())
        .err()
        .expect("a missing client CA is refused")
        .to_string();
    assert!(error.contains("missing-ca.pem"), "{error}");
    assert!(!data.exists());
}

struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
    client_der: Vec<u8>,
}

fn pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "audit-ledger test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "compliance-tool");
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();

    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
        client_der: client.der().to_vec(),
    }
}

#[tokio::test]
async fn tls_with_tokens_and_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let (auth_file, tokens) = principals(dir.path());
    // The client certificate is the credential of an auditor.
    let mut text = std::fs::read_to_string(&auth_file).unwrap();
    text.push_str(&format!(
        "\n[[principals]]\nname = \"cert-auditor\"\nrole = \"auditor\"\nclient_cert_sha256 = \"{}\"\n",
        audit_ledger::auth::digest_hex(&pki.client_der)
    ));
    std::fs::write(&auth_file, text).unwrap();

    let mut config = ServerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    config.auth_file = Some(auth_file);
    config.tls = Some(TlsFiles {
        cert: write("server.pem", &pki.server_cert),
        key: write("server.key", &pki.server_key),
        client_ca: Some(write("ca.pem", &pki.ca)),
    });
    let server = TestServer::start_with(config).await;
    let url = format!(
        "https://localhost:{}",
        server.address.rsplit(':').next().unwrap()
    );
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");

    // A bearer token over TLS, no client certificate.
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut writer =
        LedgerServiceClient::with_interceptor(channel, Bearer(Some(tokens.writer.clone())));
    writer
        .append(AppendRequest {
            communication: Some(communication("fabrikam-mail", 1)),
        })
        .await
        .unwrap();

    // A client certificate alone authenticates its principal.
    let with_cert = tls
        .clone()
        .identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(with_cert)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cert_client = LedgerServiceClient::new(channel);
    let entry = cert_client
        .get_entry(GetEntryRequest { index: 0 })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let record = entry.record.unwrap();
    assert_eq!(record.submitted_by, "mail-gateway");
    assert!(matches!(
        record.record,
        Some(leaf_record::Record::Communication(_))
    ));
    let status = cert_client
        .append(AppendRequest {
            communication: Some(communication("x", 2)),
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::PermissionDenied,
        "the certificate is an auditor's"
    );

    // Neither: UNAUTHENTICATED. Plain text to a TLS port: no connection at all.
    let channel = Channel::from_shared(url)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = LedgerServiceClient::new(channel)
        .get_checkpoint(GetCheckpointRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut plain = common::connect(&server.address).await;
    assert!(
        plain
            .get_checkpoint(GetCheckpointRequest::default())
            .await
            .is_err()
    );
    server.stop().await;
}

#[tokio::test]
async fn reads_by_auditors_and_admins_are_in_a_hash_chained_access_log() {
    use audit_ledger::proto::ListAccessLogRequest;
    use audit_ledger::proto::access_log_service_client::AccessLogServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let (auth_file, tokens) = principals(dir.path());
    let data = dir.path().join("data");
    let mut config = ServerConfig::new(&data, "127.0.0.1:0".parse().unwrap());
    config.auth_file = Some(auth_file);
    let server = TestServer::start_with(config).await;
    let address = server.address.clone();

    let mut writer = ledger_as(&address, Some(&tokens.writer)).await;
    writer
        .append(AppendRequest {
            communication: Some(communication("s", 1)),
        })
        .await
        .unwrap();
    // A writer's pre-send check is not a read of the archive.
    let mut writer_compliance = ComplianceServiceClient::with_interceptor(
        channel(&address).await,
        Bearer(Some(tokens.writer.clone())),
    );
    writer_compliance
        .check_sender(CheckSenderRequest {
            sender_id: "s".into(),
            customer_id: "c".into(),
            topic: Topic::General as i32,
            ..Default::default()
        })
        .await
        .unwrap();

    let mut auditor = ledger_as(&address, Some(&tokens.auditor)).await;
    auditor
        .get_entry(GetEntryRequest { index: 0 })
        .await
        .unwrap();
    let mut auditor_compliance = ComplianceServiceClient::with_interceptor(
        channel(&address).await,
        Bearer(Some(tokens.auditor.clone())),
    );
    auditor_compliance
        .list_violations(ListViolationsRequest {
            customer_id: "customer-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Auditors cannot read the trail of auditors.
    let mut as_auditor = AccessLogServiceClient::with_interceptor(
        channel(&address).await,
        Bearer(Some(tokens.auditor.clone())),
    );
    let status = as_auditor
        .list_access_log(ListAccessLogRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut as_admin = AccessLogServiceClient::with_interceptor(
        channel(&address).await,
        Bearer(Some(tokens.admin.clone())),
    );
    let log = as_admin
        .list_access_log(ListAccessLogRequest::default())
        .await
        .unwrap()
        .into_inner();
    let seen: Vec<(&str, &str, u64)> = log
        .records
        .iter()
        .map(|r| (r.principal.as_str(), r.method.as_str(), r.result_count))
        .collect();
    assert_eq!(
        seen,
        [
            (
                "compliance-tool",
                "/audit.ledger.v1.LedgerService/GetEntry",
                1
            ),
            (
                "compliance-tool",
                "/audit.ledger.v1.ComplianceService/ListViolations",
                // The unknown sender "s" is one violation.
                1
            ),
        ]
    );
    assert!(
        log.records[1]
            .request
            .contains("customer_id=\"customer-1\""),
        "{}",
        log.records[1].request
    );
    assert_eq!(log.records[1].prev_hash, log.records[0].record_hash);
    assert_eq!(log.records[0].prev_hash, vec![0u8; 32]);
    assert_eq!(log.next_index, 2);
    // Reading the trail is itself recorded.
    let again = as_admin
        .list_access_log(ListAccessLogRequest {
            start_index: 2,
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.records[0].method,
        "/audit.ledger.v1.AccessLogService/ListAccessLog"
    );
    assert_eq!(again.records[0].principal, "ops");
    drop((
        writer,
        writer_compliance,
        auditor,
        auditor_compliance,
        as_auditor,
        as_admin,
    ));
    server.stop().await;

    let verify = |data: &Path| {
        let output = std::process::Command::new(common::binary())
            .args(["verify", "--data-dir"])
            .arg(data)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8(output.stdout).unwrap(),
        )
    };
    let (ok, stdout) = verify(&data);
    assert!(
        ok && stdout.contains("4 access records chained"),
        "{stdout}"
    );

    // Editing a record breaks the chain, and verify names it.
    {
        let trail = data
            .join(audit_ledger::server::STORE_DIR_NAME)
            .join(audit_ledger::storage::access_file::ACCESS_FILE);
        let mut bytes = std::fs::read(&trail).unwrap();
        // The principal of the second record.
        let at = bytes
            .windows(b"compliance-tool".len())
            .enumerate()
            .filter(|(_, window)| *window == b"compliance-tool")
            .nth(1)
            .unwrap()
            .0;
        bytes[at] = b'C';
        std::fs::write(&trail, bytes).unwrap();
    }
    let (ok, stdout) = verify(&data);
    assert!(
        !ok && stdout.starts_with("FAILED: access record 1"),
        "{stdout}"
    );
}

/// Issue 16: every ListAccessLog call by an admin is recorded, so a listing bounded by the
/// trail's current size always had one more page. The first page pins the listing to the
/// trail as it was; paging through it ends, with exactly the records that existed then.
#[tokio::test]
async fn an_admin_pages_through_the_access_log_to_its_end() {
    use audit_ledger::proto::ListAccessLogRequest;
    use audit_ledger::proto::access_log_service_client::AccessLogServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let (auth_file, tokens) = principals(dir.path());
    let mut config = ServerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
    config.auth_file = Some(auth_file);
    let server = TestServer::start_with(config).await;
    let address = server.address.clone();

    ledger_as(&address, Some(&tokens.writer))
        .await
        .append(AppendRequest {
            communication: Some(communication("s", 1)),
        })
        .await
        .unwrap();
    let mut auditor = ledger_as(&address, Some(&tokens.auditor)).await;
    for _ in 0..5 {
        auditor
            .get_entry(GetEntryRequest { index: 0 })
            .await
            .unwrap();
    }

    let mut admin = AccessLogServiceClient::with_interceptor(
        channel(&address).await,
        Bearer(Some(tokens.admin.clone())),
    );
    let mut records = Vec::new();
    // One record a page: each page read adds as many records as it returns.
    let mut request = ListAccessLogRequest {
        page_size: 1,
        ..Default::default()
    };
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 20, "paging did not end: {} records", records.len());
        let page = admin
            .list_access_log(request.clone())
            .await
            .unwrap()
            .into_inner();
        assert!(page.records.len() <= 1);
        records.extend(page.records);
        if page.next_page_token.is_empty() {
            assert_eq!(page.next_index, 5, "the size the listing was pinned to");
            break;
        }
        request.page_token = page.next_page_token;
    }
    assert_eq!(pages, 5);
    // Exactly the five reads that existed at the first call: none of the listing's own.
    let seen: Vec<(u64, &str, &str)> = records
        .iter()
        .map(|r| (r.index, r.principal.as_str(), r.method.as_str()))
        .collect();
    let expected: Vec<(u64, &str, &str)> = (0..5)
        .map(|index| {
            (
                index,
                "compliance-tool",
                "/audit.ledger.v1.LedgerService/GetEntry",
            )
        })
        .collect();
    assert_eq!(seen, expected);
    for pair in records.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].record_hash);
    }

    // The listing's own pages were recorded all the same, and a new listing sees them.
    let after = admin
        .list_access_log(ListAccessLogRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.records.len(), 5 + 5);
    assert!(after.next_page_token.is_empty());
    assert!(
        after.records[5..]
            .iter()
            .all(|r| r.principal == "ops" && r.method.ends_with("/ListAccessLog")),
        "{:?}",
        &after.records[5..]
    );

    // Paging by index ends too: each call passes back the first answer's trail_size.
    let mut request = ListAccessLogRequest {
        page_size: 3,
        ..Default::default()
    };
    let mut by_index = Vec::new();
    let mut pinned = None;
    for calls in 1.. {
        assert!(calls <= 20, "paging by index did not end");
        let page = admin
            .list_access_log(request.clone())
            .await
            .unwrap()
            .into_inner();
        let size = *pinned.get_or_insert(page.trail_size);
        assert_eq!(page.trail_size, size);
        if page.records.is_empty() {
            assert_eq!(page.next_index, size);
            break;
        }
        by_index.extend(page.records.iter().map(|r| r.index));
        request = ListAccessLogRequest {
            start_index: page.next_index,
            as_of_trail_size: page.trail_size,
            page_size: 3,
            ..Default::default()
        };
    }
    assert_eq!(by_index, (0..pinned.unwrap()).collect::<Vec<_>>());
    // Past the trail is out of range, naming the field.
    for (request, field) in [
        (
            ListAccessLogRequest {
                start_index: 1_000,
                ..Default::default()
            },
            "start_index",
        ),
        (
            ListAccessLogRequest {
                as_of_trail_size: 1_000,
                ..Default::default()
            },
            "as_of_trail_size",
        ),
    ] {
        let status = admin.list_access_log(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
        assert!(status.message().starts_with(field), "{status:?}");
    }

    // A token continues only its own listing.
    let first = admin
        .list_access_log(ListAccessLogRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = admin
        .list_access_log(ListAccessLogRequest {
            start_index: 3,
            page_size: 1,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("page_token"),
        "{}",
        status.message()
    );
    drop((auditor, admin));
    server.stop().await;
}

/// The frames of `access.log` (magic, then `len u32 | record | checksum u64`): keeps the
/// first `records` and cuts the rest off, as someone covering their tracks would.
fn keep_access_records(trail: &Path, records: usize) {
    let bytes = std::fs::read(trail).unwrap();
    let mut end = 8;
    for _ in 0..records {
        let len = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
        end += 4 + len + 8;
    }
    let file = std::fs::OpenOptions::new().write(true).open(trail).unwrap();
    file.set_len(end as u64).unwrap();
}

/// What starting the server on `config` says, when it refuses.
fn refused_start(config: &ServerConfig) -> String {
    match common::open_retrying(|| Server::open(config.clone())) {
        Ok(_) => panic!("the server started"),
        Err(error) => error.to_string(),
    }
}

/// A server on `storage` with an auth file of [`principals`] in `dir` (its data in
/// `dir/data`), and a writer's and an auditor's client of it.
struct Authed {
    server: TestServer,
    config: ServerConfig,
    data: std::path::PathBuf,
    tokens: Tokens,
    writer: Ledger,
    auditor: Ledger,
}

async fn authed(dir: &Path, storage: audit_ledger::storage::StorageKind) -> Authed {
    let (auth_file, tokens) = principals(dir);
    let data = dir.join("data");
    let mut config = ServerConfig::new(&data, "127.0.0.1:0".parse().unwrap());
    config.auth_file = Some(auth_file);
    config.storage = storage;
    let server = TestServer::start_with(config.clone()).await;
    let writer = ledger_as(&server.address, Some(&tokens.writer)).await;
    let auditor = ledger_as(&server.address, Some(&tokens.auditor)).await;
    Authed {
        server,
        config,
        data,
        tokens,
        writer,
        auditor,
    }
}

/// Issue 16, item 5: the access trail could be removed without trace — `verify` counted
/// "0 access records chained" and the server started. Each checkpoint now anchors the
/// trail's head, so a trail removed, or cut back below what was anchored, fails `verify`
/// (naming the access log and the anchor) and stops the start; put back, it passes again.
#[tokio::test(flavor = "multi_thread")]
async fn a_removed_or_cut_access_trail_fails_verify_and_stops_the_start() {
    for storage in [
        audit_ledger::storage::StorageKind::Log,
        audit_ledger::storage::StorageKind::Sled,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let Authed {
            server,
            config,
            data,
            mut writer,
            mut auditor,
            ..
        } = authed(dir.path(), storage).await;
        for n in 0..2 {
            writer
                .append(AppendRequest {
                    communication: Some(communication("s", n)),
                })
                .await
                .unwrap();
            for index in 0..=n {
                auditor.get_entry(GetEntryRequest { index }).await.unwrap();
            }
            auditor
                .get_checkpoint(GetCheckpointRequest::default())
                .await
                .unwrap();
            // Checkpoints anchor what of the trail is on disk: flushed within 500 ms.
            tokio::time::sleep(audit_ledger::access_log::FLUSH_INTERVAL * 3).await;
        }
        // Anchored by the last append's checkpoint (the five reads before it), then by the
        // checkpoint re-signed with the trail's head at shutdown (all six).
        writer
            .append(AppendRequest {
                communication: Some(communication("s", 2)),
            })
            .await
            .unwrap();
        auditor
            .get_entry(GetEntryRequest { index: 2 })
            .await
            .unwrap();
        drop((writer, auditor));
        server.stop().await;

        let (ok, stdout) = common::run_verify(&data);
        assert!(
            ok && stdout.contains("6 access records chained (6 anchored at size 3)"),
            "{storage:?}: {stdout}"
        );
        let store = data.join(audit_ledger::server::STORE_DIR_NAME);
        // Where the access log was kept before its file: nothing of the trail is there now.
        let _ = std::fs::remove_dir_all(store.join("derived"));
        let (ok, stdout) = common::run_verify(&data);
        assert!(ok, "{storage:?}: {stdout}");

        let trail = store.join(audit_ledger::storage::access_file::ACCESS_FILE);
        let kept = std::fs::read(&trail).unwrap();
        // Cut: the last records dropped, below the anchor.
        keep_access_records(&trail, 3);
        let (ok, stdout) = common::run_verify(&data);
        assert!(
            !ok && stdout.starts_with(
                "FAILED: the access log holds 3 records but the checkpoint at size 3 anchors 6"
            ),
            "{storage:?}: {stdout}"
        );
        let refusal = refused_start(&config);
        assert!(
            refusal.contains("refusing to start")
                && refusal.contains("holds 3 records but the checkpoint at size 3 anchors 6"),
            "{storage:?}: {refusal}"
        );
        // Removed: the whole trail gone.
        std::fs::remove_file(&trail).unwrap();
        let (ok, stdout) = common::run_verify(&data);
        assert!(
            !ok && stdout.contains("the access log holds 0 records")
                && stdout.contains("anchors 6"),
            "{storage:?}: {stdout}"
        );
        assert!(
            refused_start(&config).contains("holds 0 records"),
            "{storage:?}"
        );
        // Altered: a record edited in place (its chain shows it).
        std::fs::write(&trail, &kept).unwrap();
        let mut other = kept.clone();
        let at = other
            .windows(b"compliance-tool".len())
            .position(|window| window == b"compliance-tool")
            .unwrap();
        other[at] = b'C';
        std::fs::write(&trail, &other).unwrap();
        let (ok, _) = common::run_verify(&data);
        assert!(!ok, "{storage:?}: an edited trail fails (its chain)");

        // Put back as it was: it verifies, and the server starts.
        std::fs::write(&trail, &kept).unwrap();
        let (ok, stdout) = common::run_verify(&data);
        assert!(ok, "{storage:?}: {stdout}");
        TestServer::start_with(config).await.stop().await;
    }
}

/// The access trail's anchor in a checkpoint note: `access-log <records> <hash>`.
fn anchored_records(note: &str) -> Option<u64> {
    note.lines()
        .find_map(|line| line.strip_prefix("access-log "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|records| records.parse().ok())
}

/// Issue 16, item 5: anchors advanced with writes only, so the reads made since the last
/// write could be cut from the trail without trace — on an idle ledger, every read since
/// its last append. The writer now re-signs the same tree with the trail's head when the
/// trail has grown (every second, and at shutdown): reads with no write after them are
/// anchored, several checkpoints of one size verify, and cutting those reads is found.
#[tokio::test(flavor = "multi_thread")]
async fn reads_with_no_write_after_them_are_anchored_and_cutting_them_is_found() {
    for storage in [
        audit_ledger::storage::StorageKind::Log,
        audit_ledger::storage::StorageKind::Sled,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let Authed {
            server,
            config,
            data,
            tokens,
            mut writer,
            mut auditor,
        } = authed(dir.path(), storage).await;
        writer
            .append(AppendRequest {
                communication: Some(communication("s", 0)),
            })
            .await
            .unwrap();
        for _ in 0..3 {
            auditor
                .get_entry(GetEntryRequest { index: 0 })
                .await
                .unwrap();
        }
        // No write from here on. The checkpoint served comes to anchor the three reads
        // (and the polls before it): the anchor moved without a write.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let anchored = loop {
            let checkpoint = auditor
                .get_checkpoint(GetCheckpointRequest::default())
                .await
                .unwrap()
                .into_inner()
                .checkpoint
                .unwrap();
            assert_eq!(checkpoint.size, 1, "{storage:?}");
            match anchored_records(&checkpoint.note) {
                Some(records) if records >= 3 => break records,
                _ => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{storage:?}: the reads since the last write were never anchored: {}",
                checkpoint.note
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        drop((writer, auditor));
        server.stop().await;

        // Several checkpoints of size 1 (the append's, then re-signed): all verify, and the
        // last anchors every read (the shutdown anchored the polls after `anchored`).
        let (ok, stdout) = common::run_verify(&data);
        assert!(ok, "{storage:?}: {stdout}");
        let trail = data
            .join(audit_ledger::server::STORE_DIR_NAME)
            .join(audit_ledger::storage::access_file::ACCESS_FILE);
        let kept = std::fs::read(&trail).unwrap();
        // The reads cut off, back to before the first of them: found by verify and the start.
        keep_access_records(&trail, 0);
        let (ok, stdout) = common::run_verify(&data);
        assert!(
            !ok && stdout.contains("the access log holds 0 records but the checkpoint at size 1"),
            "{storage:?}: {stdout}"
        );
        assert!(
            refused_start(&config).contains("holds 0 records"),
            "{storage:?}"
        );
        assert!(anchored >= 3);

        // Put back, the server starts; reads made just before a clean stop are anchored by
        // the stop itself.
        std::fs::write(&trail, &kept).unwrap();
        let server = TestServer::start_with(config.clone()).await;
        let mut auditor = ledger_as(&server.address, Some(&tokens.auditor)).await;
        auditor
            .get_entry(GetEntryRequest { index: 0 })
            .await
            .unwrap();
        drop(auditor);
        server.stop().await;
        let records = kept_records(&trail);
        let (ok, stdout) = common::run_verify(&data);
        assert!(
            ok && stdout.contains(&format!(
                "{records} access records chained ({records} anchored at size 1)"
            )),
            "{storage:?}: {stdout}"
        );
        keep_access_records(&trail, records - 1);
        let (ok, stdout) = common::run_verify(&data);
        assert!(!ok, "{storage:?}: the last read cut off is found: {stdout}");
    }
}

/// How many records `access.log` holds (its frames, as [`keep_access_records`] reads them).
fn kept_records(trail: &Path) -> usize {
    let bytes = std::fs::read(trail).unwrap();
    let (mut end, mut records) = (8, 0);
    while end + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[end..end + 4].try_into().unwrap()) as usize;
        if len == 0 || end + 4 + len + 8 > bytes.len() {
            break;
        }
        end += 4 + len + 8;
        records += 1;
    }
    records
}
