//! Stoa's integration suite: real nodes (in-process, and real `stoa` processes for crash
//! tests) against real databases, one fresh database per test.
//!
//! Every case is written once (`cases::<name>(&TestDb)`) and runs on every backend as
//! `<name>::sqlite`, `<name>::postgres` and `<name>::mysql`. PostgreSQL and MariaDB come from
//! `STOA_TEST_PG_URL` and `STOA_TEST_MYSQL_URL`; a test whose database is missing fails, it is
//! never skipped. Run one backend with e.g. `cargo test --test integration postgres`.

mod harness;

mod cases {
    #[path = "admin.rs"]
    pub mod admin;
    #[path = "../ha.rs"]
    pub mod ha;
    #[path = "bad_input.rs"]
    pub mod bad_input;
    #[path = "cli.rs"]
    pub mod cli;
    #[path = "cluster.rs"]
    pub mod cluster;
    #[path = "component.rs"]
    pub mod component;
    #[path = "log.rs"]
    pub mod log;
    #[path = "merge.rs"]
    pub mod merge;
    #[path = "failover.rs"]
    pub mod failover;
    #[path = "operations.rs"]
    pub mod operations;
    #[path = "packaging.rs"]
    pub mod packaging;
    #[path = "permission.rs"]
    pub mod permission;
    #[path = "plugins.rs"]
    pub mod plugins;
    #[path = "room_life.rs"]
    pub mod room_life;
    #[path = "security.rs"]
    pub mod security;
    #[path = "tls.rs"]
    pub mod tls;
    #[path = "web.rs"]
    pub mod web;
    #[path = "xmpp.rs"]
    pub mod xmpp;
}

/// For each `module::case`, a test module `case` with one test per listed backend
/// (`sqlite` / `postgres` / `mysql`, named after the `Backend` variants below).
macro_rules! on_backends {
    ($backends:tt $($module:ident :: $case:ident),* $(,)?) => {$(
        case_on_backends!($backends $module $case);
    )*};
}

/// One case's test module: one test per backend in `[..]`.
macro_rules! case_on_backends {
    ([$($backend:ident),+] $module:ident $case:ident) => {
        mod $case {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    let db = crate::harness::TestDb::new(crate::backend!($backend), stringify!($case)).await;
                    crate::cases::$module::$case(&db).await;
                }
            )+
        }
    };
}

/// The harness backend a test-function name stands for.
#[macro_export]
macro_rules! backend {
    (sqlite) => { $crate::harness::Backend::Sqlite };
    (postgres) => { $crate::harness::Backend::Postgres };
    (mysql) => { $crate::harness::Backend::MySql };
}

/// Cases that run on every backend.
macro_rules! on_every_backend {
    ($($t:tt)*) => { on_backends!([sqlite, postgres, mysql] $($t)*); };
}

/// Cases that need a store shared by two nodes (PostgreSQL, MariaDB).
macro_rules! on_shared_stores {
    ($($t:tt)*) => { on_backends!([postgres, mysql] $($t)*); };
}

on_shared_stores! {
    ha::peers_see_each_other_over_the_link_and_notice_a_stop,
    ha::without_ha_a_down_nodes_rooms_are_unavailable_then_intact,
    ha::admin_failover_then_automatic_fallback,
    ha::whole_pair_stop_and_start_comes_back_normal,
    ha::failover_of_a_node_without_rooms_stays_until_fallback,
    failover::kill9_failover_restart_and_fallback_lose_nothing,
    failover::xmpp_clients_lose_nothing_across_kill9_failover,
    failover::prosody_users_keep_their_room_across_a_kill9_failover,
    failover::critical_service_stop_fails_over_then_fallback,
    failover::sigstop_past_the_lease_then_the_node_steps_down,
    plugins::plugin_state_moves_with_the_room_on_failover,
}

/// Fault cases that run on PostgreSQL only (the fencing itself is covered on MariaDB above).
macro_rules! on_postgres {
    ($($t:tt)*) => { on_backends!([postgres] $($t)*); };
}

on_postgres! {
    failover::store_connections_killed_lose_nothing,
    failover::no_failover_when_the_link_is_cut_while_the_store_sees_both,
    failover::fallback_racing_a_second_failover,
    failover::clients_on_the_peer_use_rooms_over_the_link,
    failover::xmpp_clients_on_the_peer_use_rooms_over_the_link,
    component::ejabberd_component_link_over_tls,
    failover::prosody_users_rejoin_after_a_maintenance_failover,
    tls::xmpp_direct_tls_listener,
    security::a_captured_node_link_hello_cannot_be_replayed,
    operations::ready_is_not_health,
    operations::admin_views_answer_while_the_store_is_busy,
    failover::admin_status_tells_a_dead_node_from_a_normal_one,
    tls::ha_pair_node_link_runs_over_tls,
    log::a_resumed_sessions_resends_take_no_redo,
    log::small_batches_wait_for_the_transaction_in_flight,
}

on_every_backend! {
    component::prosody_users_chat_in_stoa_rooms_through_the_component,
    component::ejabberd_users_chat_in_stoa_rooms_through_the_component,
    component::bad_input_from_the_host_server_never_ends_the_component_link,
    ha::leases_live_and_expire_on_the_database_clock,
    ha::a_takeover_moves_the_failed_nodes_rooms_to_a_new_epoch,
    ha::welcome_names_the_peer_and_tokens_work_across_the_group,
    ha::an_ha_node_records_its_states_and_holds_its_lease,
    log::acked_messages_survive_kill_and_restart,
    log::seq_is_contiguous_under_concurrent_senders,
    log::seq_is_contiguous_with_a_committer_gather,
    log::resends_are_deduplicated_by_cid,
    log::one_cid_from_two_senders_in_one_commit_is_two_messages,
    log::nothing_is_acked_when_the_commit_fails,
    log::a_group_commit_fences_each_room_on_its_own,
    room_life::idle_room_passivates_and_reactivates_intact,
    room_life::joins_into_a_reactivated_room_replay_exactly_what_they_miss,
    room_life::churn_with_repeated_passivation_drops_no_request,
    permission::room_permissions_are_enforced,
    bad_input::malformed_requests_get_errors_and_the_room_keeps_working,
    bad_input::failed_logins_answer_unauthorized,
    bad_input::transport_violations_close_with_documented_codes,
    bad_input::request_floods_are_rate_limited,
    bad_input::slow_consumer_is_disconnected_and_others_are_unaffected,
    admin::admin_api_reports_health_rooms_and_metrics,
    admin::concurrent_migrations_both_succeed,
    security::history_is_paged_by_bytes_and_the_connection_keeps_working,
    security::out_of_range_numbers_nul_and_duplicate_keys_are_refused,
}

// `stoa db merge` (issue 15): each backend pair into the case's database as the target.
on_postgres! {
    merge::sqlite_pair_merges_into_postgres,
    merge::postgres_pair_merges_into_postgres,
    merge::postgres_and_mariadb_merge_into_postgres,
    merge::a_target_user_without_write_privileges_is_refused,
}
on_backends! {[mysql]
    merge::mariadb_pair_merges_into_mariadb,
}
on_shared_stores! {
    merge::a_store_with_a_running_ha_node_is_refused,
    merge::merged_stores_serve_an_ha_pair,
}
on_every_backend! {
    merge::each_conflict_rule_applies,
    merge::kill9_mid_merge_then_resume_gives_the_same_store,
}

// The operator's command line (issue 9): what touches the store on every backend, the rest
// on SQLite.
on_every_backend! {
    cli::a_port_in_use_is_reported_before_migrations,
    cli::users_get_new_passwords_and_are_deleted,
    cli::rooms_are_configured_and_destroyed_and_audited,
    cli::a_kicked_session_loses_its_connection_and_its_token,
}

on_backends! {[sqlite]
    cli::relative_paths_in_a_config_file_follow_the_file,
    cli::config_comes_after_the_verb_or_from_stoa_config,
    cli::config_check_says_ok_or_names_the_problem_once,
}

on_every_backend! {
    plugins::plugin_state_survives_a_node_restart,
    plugins::plugin_state_writes_are_fenced,
}

// Transport behaviour does not depend on the store.
on_backends! {[sqlite]
    room_life::connections_on_the_io_runtime_or_on_several_arbiters_serve_alike,
    security::slow_loris_sockets_do_not_lock_out_real_clients,
    operations::a_node_whose_log_reader_has_gone_serves_and_stops_on_sigterm,
    security::failed_logins_are_throttled_across_connections,
    security::a_guest_cannot_be_claimed_by_another_connection,
    security::lookalike_nicks_and_user_names_are_refused,
    security::list_pages_and_room_creation_has_a_budget,
    tls::tls_on_client_and_admin_listeners_with_certificate_reload,
    tls::sighup_reloads_the_certificate_of_a_running_process,
}

// XMPP clients (slixmpp, tests/xmpp/client.py) in Stoa rooms beside v1 clients; raw sockets
// for the bad input (its handling does not depend on the store).
on_every_backend! {
    xmpp::xmpp_and_v1_clients_share_a_room,
}
on_backends! {[sqlite]
    xmpp::xmpp_bad_input_gets_stream_errors_and_the_node_keeps_working,
    xmpp::xmpp_over_websocket_joins_and_chats,
    xmpp::xmpp_owners_configure_kick_affiliate_and_destroy,
    xmpp::xmpp_stream_management_acks_and_resumes,
    xmpp::converse_js_in_chromium_chats_with_v1_and_reloads,
    xmpp::xmpp_scram_logins_and_bad_scram_input,
}

// Process integration (systemd notify, the log file, process metrics) does not depend on the
// store: SQLite only.
on_backends! {[sqlite]
    packaging::under_systemd_the_node_notifies_ready_watchdog_and_stopping,
    packaging::without_watchdog_sec_the_node_sends_no_pings,
    packaging::sighup_reopens_the_log_file_after_rotation,
    packaging::metrics_report_the_process_cpu_memory_fds_and_start_time,
}

// Plugin behaviour does not depend on the store: these run on SQLite only.
on_backends! {[sqlite]
    plugins::message_hooks_filter_rewrite_and_answer_commands,
    plugins::join_leave_created_and_config_hooks_run,
    plugins::misbehaving_plugins_are_stopped_and_the_room_keeps_working,
    plugins::plugin_is_disabled_after_repeated_faults_and_reload_restores_it,
    plugins::fail_closed_refuses_what_a_faulting_plugin_could_not_check,
    plugins::reload_under_traffic_loses_nothing,
    plugins::a_room_with_a_bad_plugin_config_only_breaks_itself,
}

// The console and the chat page (issue 16): their HTTP rules on SQLite, the pages in
// Chromium against a real pair on PostgreSQL.
on_backends! {[sqlite]
    web::console_sessions_need_the_cookie_and_the_csrf_token,
    web::the_client_listener_serves_the_chat_page_when_asked,
}
on_postgres! {
    web::console_in_chromium_stops_a_service_and_falls_back,
    web::chat_page_in_chromium_survives_kill9_of_its_node,
}

// Clusters of groups (issue 14): three PostgreSQL pairs and a SQLite single node.
on_postgres! {
    cluster::three_pairs_and_a_single_node_survive_a_kill9,
    cluster::a_partition_between_groups_waits_then_fails_clearly,
    cluster::followers_wait_for_a_slow_fence_instead_of_retrying,
    cluster::a_peering_cluster_uses_rooms_across_a_failover,
    cluster::users_log_in_on_their_home_node,
}

/// The short CI version of the benchmarks: `stoa bench` (the real binary, spawning its own
/// SQLite server) runs each load mode briefly and prints the JSON summary with real figures.
/// The full runs are `scripts/bench-suite.sh` (docs/benchmarks.md).
mod bench_smoke {
    fn run_bench(args: &[&str]) -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stoa"))
            .arg("bench")
            .args(args)
            .args(["--format", "json"])
            .output()
            .expect("running stoa bench");
        assert!(
            out.status.success(),
            "stoa bench {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stoa bench {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }

    #[test]
    fn throughput_bench_commits_and_reports_every_field() {
        let v = run_bench(&["throughput", "--rooms", "4", "--duration", "1s", "--warmup", "0s"]);
        for field in ["committed_per_s", "deliveries_per_s", "ack_p50_ms", "ack_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "e2e_p999_ms", "server_rss_bytes"] {
            assert!(v[field].is_number(), "`{field}` missing in {v}");
        }
        assert_eq!(v["store"], "sqlite", "{v}");
        assert!(v["committed_per_s"].as_f64().unwrap() > 0.0, "nothing committed: {v}");
    }

    #[test]
    fn idle_room_bench_measures_memory_per_room() {
        let v = run_bench(&["idle-rooms", "--rooms", "2000", "--warm-rooms", "200"]);
        assert!(v["bytes_per_idle_room"].as_f64().is_some_and(|b| b > 0.0), "{v}");
    }

    /// `bench connections`, small: 200 guests in 10 rooms, idle and then sending once a second
    /// each, report their server memory per connection, their acks and no errors.
    #[test]
    fn connections_bench_measures_memory_per_connection() {
        let v = run_bench(&["connections", "--connections", "200", "--rooms", "10", "--settle", "500ms", "--duration", "2s", "--per-minute", "60"]);
        assert_eq!(v["mode"], "connections", "{v}");
        assert_eq!(v["connections"], 200, "{v}");
        for field in ["bytes_per_connection_idle", "bytes_per_connection_active", "server_rss_before_bytes", "server_rss_idle_bytes", "connect_per_s", "ack_p50_ms", "ack_p99_ms", "cpu_cores_server"] {
            assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "`{field}` missing or not positive in {v}");
        }
        assert!(v["acks"].as_u64().is_some_and(|a| a > 0), "nothing acked: {v}");
        assert_eq!(v["errors"], serde_json::json!({}), "{v}");
    }

    /// `bench cluster`, small: the seven nodes of examples/cluster on fresh databases of
    /// STOA_TEST_PG_URL, 10 rooms forwarded and local, then kill -9 of 2a with 20 rooms and 10
    /// clients on every node: every field there, every acked probe stored once.
    #[test]
    fn cluster_bench_forwards_fails_over_and_loses_nothing() {
        let pg = std::env::var("STOA_TEST_PG_URL").expect("STOA_TEST_PG_URL is not set: `bench cluster` needs PostgreSQL");
        let v = run_bench(&[
            "cluster", "--pg-url", &pg, "--rooms", "10", "--rate", "5", "--duration", "1s", "--warmup", "500ms", "--rounds", "1",
            "--failover-rooms", "20", "--other-rooms", "10", "--clients", "10", "--settle", "1s",
        ]);
        assert_eq!(v["mode"], "cluster", "{v}");
        for field in ["forwarded_msg_per_s", "local_msg_per_s", "forwarded_e2e_p50_ms", "local_e2e_p99_ms", "forwarded_cpu_us_per_msg", "local_cpu_us_per_msg"] {
            assert!(v[field].as_f64().is_some_and(|x| x > 0.0), "`{field}` missing or not positive in {v}");
        }
        for field in ["forwarded_cpu_ratio", "failover_ms_p50", "failover_ms_max", "exit_ms", "detect_ms", "client_resume_ms_p99"] {
            assert!(v[field].is_number(), "`{field}` missing in {v}");
        }
        assert!(v["acked"].as_u64().is_some_and(|a| a > 0), "nothing acked: {v}");
        assert_eq!(v["acked_lost"], 0, "{v}");
        assert_eq!(v["duplicates"], 0, "{v}");
        assert_eq!(v["overhead_errors"], 0, "{v}");
        // The clients on the other groups' nodes followed pair 2's rooms to 2b.
        assert!(v["rooms_followed"].as_u64().is_some_and(|n| n > 0), "no room followed: {v}");
        assert!(v["follow_retries"].is_u64() && v["probe_resends"].is_object(), "{v}");
    }

    /// `bench xmpp` against Stoa only (the comparison with Prosody is a documented command,
    /// docs/benchmarks.md: CI does not install Prosody).
    #[test]
    fn xmpp_bench_loads_stoa_over_c2s_and_reports_every_field() {
        let v = run_bench(&["xmpp", "--server", "stoa", "--rooms", "3", "--occupants", "4", "--rounds", "1", "--duration", "2s", "--warmup", "500ms"]);
        let run = &v["runs"][0];
        assert_eq!(run["server"], "stoa", "{v}");
        assert!(run["deliveries_per_s"].as_f64().is_some_and(|d| d > 0.0), "nothing delivered: {v}");
        assert!(run["messages_per_s"].as_f64().is_some_and(|m| m > 0.0), "nothing reflected: {v}");
        for field in ["e2e_p50_ms", "e2e_p99_ms", "e2e_p999_ms", "cpu_cores_server", "deliveries_per_cpu_s"] {
            assert!(run[field].as_f64().is_some_and(|x| x > 0.0), "`{field}` missing or zero in {v}");
            assert!(v["stoa_median"][field].is_number(), "median `{field}` missing in {v}");
        }
        assert_eq!(run["errors"], serde_json::json!({}), "{v}");
        assert!(v.get("ratio_stoa_over_prosody").is_none(), "no ratio without Prosody: {v}");
    }
}
