//! Attaching the loaded programs to the kernel, in the order the design needs, and saying
//! which ones the kernel refused.

use std::{fs, io};

use aya::{
    Ebpf,
    programs::{BtfTracePoint, FExit, ProgramError, TracePoint},
};
use tracer_common::{
    settings::SockOffsets,
    tracepoint::{self, retransmit, synack},
};

use super::{
    ACCEPT_FUNCTION, ACCEPT_PROGRAM, BtfError, MAIN_PROGRAM, Part, PartStatus, ProbeError,
    ProbeOptions, RETRANSMIT_PROGRAM, STANDBY_PROGRAM, SYNACK_PROGRAM, verifier::refusal,
};

/// Attaches the main program, and the optional ones where the kernel takes them: the
/// tracepoint calls its programs in the order they were attached, so the standby goes second
/// (first only when a test asks), to see transitions after the main program had its chance.
pub(super) fn attach_parts(
    ebpf: &mut Ebpf,
    options: &ProbeOptions,
    btf: Option<&aya::Btf>,
    sock: Result<&SockOffsets, &BtfError>,
    accept_parameters: Result<&u32, &BtfError>,
    retransmit_layout: Result<(), String>,
) -> Result<Vec<PartStatus>, ProbeError> {
    let mut standby = Err("not attached".to_owned());
    if options.standby_first {
        standby = attach_standby(ebpf, btf, sock);
    }
    attach_main(ebpf)?;
    if !options.standby_first {
        standby = attach_standby(ebpf, btf, sock);
    }
    let accept_owner = match accept_parameters {
        Ok(_) => attach_accept_owner(ebpf, btf),
        Err(error) => Err(error.to_string()),
    };
    let retransmits = retransmit_layout.and_then(|()| attach_retransmits(ebpf, btf));
    let parts = vec![
        PartStatus { part: Part::Main, unavailable: None },
        PartStatus { part: Part::Standby, unavailable: standby.err() },
        PartStatus { part: Part::AcceptOwner, unavailable: accept_owner.err() },
        PartStatus { part: Part::Retransmits, unavailable: retransmits.err() },
    ];
    for status in &parts {
        if let Some(reason) = &status.unavailable {
            let part = status.part;
            log::warn!(
                "running without the {} program ({reason}): {}",
                part.name(),
                part.without()
            );
        }
    }
    Ok(parts)
}

fn attach_main(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    let refused = |source: ProgramError| ProbeError::LoadProgram {
        program: MAIN_PROGRAM,
        reason: refusal(MAIN_PROGRAM, &source),
    };
    let program: &mut TracePoint = ebpf
        .program_mut(MAIN_PROGRAM)
        .ok_or(ProbeError::Missing(MAIN_PROGRAM))?
        .try_into()
        .map_err(refused)?;
    program.load().map_err(refused)?;
    program.attach(tracepoint::CATEGORY, tracepoint::NAME).map_err(|source| {
        ProbeError::Attach {
            program: MAIN_PROGRAM,
            target: format!("tracepoint {}:{}", tracepoint::CATEGORY, tracepoint::NAME),
            hint: perf_event_hint(&source),
            source: Box::new(source),
        }
    })?;
    Ok(())
}

/// Why a perf event was refused, when it was for lack of privilege. Debian's kernels add a
/// level 3 to `kernel.perf_event_paranoid` (their default) at which perf events need
/// CAP_SYS_ADMIN, CAP_PERFMON not being enough (seen on their 5.10 and 6.1).
fn perf_event_hint(error: &ProgramError) -> String {
    let denied = crate::error_chain::causes(error)
        .filter_map(|e| e.downcast_ref::<io::Error>())
        .any(|e| e.kind() == io::ErrorKind::PermissionDenied);
    if !denied {
        return String::new();
    }
    let paranoid = fs::read_to_string("/proc/sys/kernel/perf_event_paranoid").unwrap_or_default();
    match paranoid.trim().parse::<i32>() {
        Ok(level) if level >= 3 => format!(
            "; kernel.perf_event_paranoid is {level}, at which this kernel allows perf events \
             only with CAP_SYS_ADMIN (Debian's default): run as root, add CAP_SYS_ADMIN, or \
             `sysctl kernel.perf_event_paranoid=2`"
        ),
        _ => "; perf events need CAP_PERFMON (or CAP_SYS_ADMIN)".to_owned(),
    }
}

/// The standby program, on the tracepoint's BTF flavour; it needs the socket's field offsets.
fn attach_standby(
    ebpf: &mut Ebpf,
    btf: Option<&aya::Btf>,
    sock: Result<&SockOffsets, &BtfError>,
) -> Result<(), String> {
    sock.map_err(ToString::to_string)?;
    let btf = btf.ok_or("no kernel BTF")?;
    let refused = |error: ProgramError| refusal(STANDBY_PROGRAM, &error);
    let program: &mut BtfTracePoint = ebpf
        .program_mut(STANDBY_PROGRAM)
        .ok_or("the eBPF object has no standby program")?
        .try_into()
        .map_err(refused)?;
    program.load(tracepoint::NAME, btf).map_err(refused)?;
    program.attach().map_err(refused)?;
    Ok(())
}

/// The optional fexit program that names the owner of an accepted socket.
fn attach_accept_owner(ebpf: &mut Ebpf, btf: Option<&aya::Btf>) -> Result<(), String> {
    let btf = btf.ok_or("no kernel BTF")?;
    let refused = |error: ProgramError| refusal(ACCEPT_PROGRAM, &error);
    let program: &mut FExit = ebpf
        .program_mut(ACCEPT_PROGRAM)
        .ok_or("the eBPF object has no accept hook")?
        .try_into()
        .map_err(refused)?;
    program.load(ACCEPT_FUNCTION, btf).map_err(refused)?;
    program.attach().map_err(refused)?;
    Ok(())
}

/// The two retransmit counters, on their tracepoints' BTF flavour; one part: either alone
/// would count half of what the metric says.
fn attach_retransmits(ebpf: &mut Ebpf, btf: Option<&aya::Btf>) -> Result<(), String> {
    let btf = btf.ok_or("no kernel BTF")?;
    for (program_name, tracepoint) in
        [(RETRANSMIT_PROGRAM, retransmit::NAME), (SYNACK_PROGRAM, synack::NAME)]
    {
        let refused = |error: ProgramError| refusal(program_name, &error);
        let program: &mut BtfTracePoint = ebpf
            .program_mut(program_name)
            .ok_or("the eBPF object has no retransmit counter")?
            .try_into()
            .map_err(refused)?;
        program.load(tracepoint, btf).map_err(refused)?;
        program.attach().map_err(refused)?;
    }
    Ok(())
}

/// Program names (as the kernel keeps them, 15 bytes) of known tracers of this tracepoint:
/// tcpstate's own two, libbpf-tools' and BCC's `tcpstates`.
const KNOWN_TRACERS: [&str; 4] =
    ["inet_sock_set_s", "standby", "handle_set_stat", "tracepoint__soc"];

/// Programs of other known tracers of `sock:inet_sock_set_state` loaded in the kernel now (as
/// `name (id N)`): another tcpstate, or a `tcpstates`. Called before attaching, every match is
/// someone else's. They change the order in which the tracepoint calls programs.
pub fn other_tracers() -> Vec<String> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|info| {
            let name = info.name_as_str()?;
            KNOWN_TRACERS.contains(&name).then(|| format!("{name} (id {})", info.id()))
        })
        .collect()
}
