//! Struct member offsets from the running kernel's BTF, for the few kernel structures the
//! program reads beyond the tracepoint record (a socket's network namespace).
//!
//! Rust eBPF programs get no CO-RE relocations, so the loader resolves offsets here and hands
//! them to the program as read-only globals.

use std::path::Path;

use btf_rs::{Btf, Type};
use thiserror::Error;
use tracer_common::settings::{OFFSET_UNKNOWN, SockOffsets, TotalsOffsets};

pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF at {VMLINUX_BTF}: {0}. tcpstate needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (standard on current distributions)"
    )]
    Unavailable(String),
    #[error("kernel BTF has no `{path}` in struct {type_name}: {reason}")]
    NoMember { type_name: String, path: String, reason: String },
    #[error("kernel BTF has no function `{name}`: {reason}")]
    NoFunction { name: String, reason: String },
    #[error("kernel BTF has no tracepoint `{name}`: {reason}")]
    NoTracepoint { name: String, reason: String },
}

impl BtfError {
    fn no_member(type_name: &str, path: &str, reason: impl Into<String>) -> Self {
        Self::NoMember {
            type_name: type_name.to_owned(),
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The kernel's type information.
pub(crate) struct KernelBtf(Btf);

impl KernelBtf {
    pub(crate) fn load() -> Result<Self, BtfError> {
        Self::from_file(Path::new(VMLINUX_BTF))
    }

    pub(crate) fn from_file(path: &Path) -> Result<Self, BtfError> {
        Btf::from_file(path).map(Self).map_err(|error| BtfError::Unavailable(error.to_string()))
    }

    /// Byte offset of `path` (dot-separated members, e.g. `__sk_common.skc_net`) in struct
    /// `type_name`. Anonymous structs and unions along the way are searched as C does.
    pub(crate) fn offset_of(&self, type_name: &str, path: &str) -> Result<u32, BtfError> {
        let no_member = |reason: String| BtfError::no_member(type_name, path, reason);
        let mut current = self
            .0
            .resolve_types_by_name(type_name)
            .map_err(|e| no_member(e.to_string()))?
            .into_iter()
            .find(|ty| matches!(ty, Type::Struct(_)))
            .ok_or_else(|| no_member("no such struct".to_owned()))?;
        let mut bits = 0;
        for name in path.split('.') {
            let (member_bits, member_type) = self
                .find_member(&current, name, 0)
                .ok_or_else(|| no_member(format!("no member `{name}`")))?;
            bits += member_bits;
            current = member_type;
        }
        if bits % 8 != 0 {
            return Err(no_member("a bitfield, not byte-addressable".to_owned()));
        }
        Ok(bits / 8)
    }

    /// How many parameters kernel function `name` takes.
    pub(crate) fn parameter_count(&self, name: &str) -> Result<u32, BtfError> {
        let no_function = |reason: String| BtfError::NoFunction { name: name.to_owned(), reason };
        let types = self.0.resolve_types_by_name(name).map_err(|e| no_function(e.to_string()))?;
        let Some(Type::Func(func)) = types.into_iter().find(|ty| matches!(ty, Type::Func(_)))
        else {
            return Err(no_function("no such function".to_owned()));
        };
        match self.0.resolve_chained_type(&func) {
            Ok(Type::FuncProto(proto)) => Ok(proto.parameters.len() as u32),
            _ => Err(no_function("its type is not a function prototype".to_owned())),
        }
    }

    /// How many arguments tracepoint `name` passes the programs on its BTF flavour (the
    /// `btf_trace_<name>` prototype, less its leading `void *`).
    pub(crate) fn tracepoint_argument_count(&self, name: &str) -> Result<u32, BtfError> {
        let no_tracepoint =
            |reason: String| BtfError::NoTracepoint { name: name.to_owned(), reason };
        let typedef = format!("btf_trace_{name}");
        let types =
            self.0.resolve_types_by_name(&typedef).map_err(|e| no_tracepoint(e.to_string()))?;
        let Some(Type::Typedef(typedef)) =
            types.into_iter().find(|ty| matches!(ty, Type::Typedef(_)))
        else {
            return Err(no_tracepoint("no such tracepoint".to_owned()));
        };
        let pointer = self.0.resolve_chained_type(&typedef).ok();
        let proto = match pointer {
            Some(Type::Ptr(pointer)) => self.0.resolve_chained_type(&pointer).ok(),
            _ => None,
        };
        match proto {
            Some(Type::FuncProto(proto)) if !proto.parameters.is_empty() => {
                Ok(proto.parameters.len() as u32 - 1)
            }
            _ => Err(no_tracepoint("its type is not a pointer to a function prototype".to_owned())),
        }
    }

    /// Finds member `name` in the struct or union `ty`, descending into anonymous members.
    /// Returns its bit offset from the start of `ty` and its type with typedefs and
    /// qualifiers stripped.
    fn find_member(&self, ty: &Type, name: &str, depth: usize) -> Option<(u32, Type)> {
        const MAX_ANONYMOUS_NESTING: usize = 8;
        let (Type::Struct(st) | Type::Union(st)) = self.strip(ty.clone())? else {
            return None;
        };
        for member in &st.members {
            let member_name = self.0.resolve_name(member).unwrap_or_default();
            let member_type = self.strip(self.0.resolve_chained_type(member).ok()?)?;
            if member_name == name {
                return Some((member.bit_offset(), member_type));
            }
            if member_name.is_empty()
                && depth < MAX_ANONYMOUS_NESTING
                && let Some((inner, found)) = self.find_member(&member_type, name, depth + 1)
            {
                return Some((member.bit_offset() + inner, found));
            }
        }
        None
    }

    /// Follows typedefs, const, volatile and type tags to the underlying type.
    fn strip(&self, mut ty: Type) -> Option<Type> {
        for _ in 0..16 {
            match &ty {
                Type::Typedef(t) => ty = self.0.resolve_chained_type(t).ok()?,
                Type::Const(t) => ty = self.0.resolve_chained_type(t).ok()?,
                Type::Volatile(t) => ty = self.0.resolve_chained_type(t).ok()?,
                Type::TypeTag(t) => ty = self.0.resolve_chained_type(t).ok()?,
                Type::Restrict(t) => ty = self.0.resolve_chained_type(t).ok()?,
                _ => return Some(ty),
            }
        }
        None
    }
}

/// Offsets the program needs to read a socket's network namespace inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NetnsOffsets {
    /// `struct sock` → `__sk_common.skc_net.net` (a `struct net *`).
    pub sk_net: u32,
    /// `struct net` → `ns.inum`.
    pub net_inum: u32,
}

impl NetnsOffsets {
    pub(crate) fn resolve(btf: &KernelBtf) -> Result<Self, BtfError> {
        Ok(Self {
            sk_net: btf.offset_of("sock", "__sk_common.skc_net.net")?,
            net_inum: btf.offset_of("net", "ns.inum")?,
        })
    }
}

/// Offsets the program needs to name a process by its main thread's `comm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TaskOffsets {
    pub group_leader: u32,
    pub comm: u32,
}

impl TaskOffsets {
    pub(crate) fn resolve(btf: &KernelBtf) -> Result<Self, BtfError> {
        Ok(Self {
            group_leader: btf.offset_of("task_struct", "group_leader")?,
            comm: btf.offset_of("task_struct", "comm")?,
        })
    }
}

impl KernelBtf {
    fn offset_u16(&self, type_name: &str, path: &str) -> Result<u16, BtfError> {
        let offset = self.offset_of(type_name, path)?;
        u16::try_from(offset).map_err(|_| {
            BtfError::no_member(type_name, path, format!("offset {offset} is too large"))
        })
    }
}

/// Offset of `sock.sk_err`: the errno a failed or reset connection leaves.
pub(crate) fn sk_err_offset(btf: &KernelBtf) -> Result<u16, BtfError> {
    btf.offset_u16("sock", "sk_err")
}

/// Offset of `tcp_sock.srtt_us`: the round-trip time a server's handshake completes with.
pub(crate) fn srtt_offset(btf: &KernelBtf) -> Result<u32, BtfError> {
    btf.offset_of("tcp_sock", "srtt_us")
}

/// Offsets of the counters a closing connection's totals are read from; any one the kernel
/// lacks is unknown (its total then reads 0), and named in the error list.
pub(crate) fn totals_offsets(btf: &KernelBtf) -> (TotalsOffsets, Vec<BtfError>) {
    let mut missing = Vec::new();
    let mut offset = |type_name: &str, field: &str| {
        btf.offset_of(type_name, field).unwrap_or_else(|error| {
            missing.push(error);
            OFFSET_UNKNOWN
        })
    };
    let offsets = TotalsOffsets {
        bytes_acked: offset("tcp_sock", "bytes_acked"),
        bytes_received: offset("tcp_sock", "bytes_received"),
        total_retrans: offset("tcp_sock", "total_retrans"),
        snd_una: offset("tcp_sock", "snd_una"),
        write_seq: offset("tcp_sock", "write_seq"),
        // In `sock_common` since Linux 4.20 (`sk_flags` is a macro for it), in `sock` before.
        sk_flags: btf
            .offset_of("sock", "__sk_common.skc_flags")
            .or_else(|_| btf.offset_of("sock", "sk_flags"))
            .unwrap_or_else(|error| {
                missing.push(error);
                OFFSET_UNKNOWN
            }),
    };
    (offsets, missing)
}

/// Offset of a request socket's local port (`inet_rsk(req)->ir_num`, host order), which the
/// SYN-ACK retransmit counter reads.
pub(crate) fn request_port_offset(btf: &KernelBtf) -> Result<u16, BtfError> {
    btf.offset_u16("request_sock", "__req_common.skc_num")
}

/// Where the classic tracepoints' assignments read each field, for the programs on BTF
/// tracepoints, which read them from the socket itself.
pub(crate) fn sock_offsets(btf: &KernelBtf) -> Result<SockOffsets, BtfError> {
    // `inet_sk(sk)` is a cast: struct inet_sock begins with its struct sock.
    if btf.offset_of("inet_sock", "sk")? != 0 {
        return Err(BtfError::no_member("inet_sock", "sk", "struct sock is not at its start"));
    }
    Ok(SockOffsets {
        family: btf.offset_u16("sock", "__sk_common.skc_family")?,
        state: btf.offset_u16("sock", "__sk_common.skc_state")?,
        protocol: btf.offset_u16("sock", "sk_protocol")?,
        sport: btf.offset_u16("inet_sock", "inet_sport")?,
        dport: btf.offset_u16("sock", "__sk_common.skc_dport")?,
        saddr: btf.offset_u16("inet_sock", "inet_saddr")?,
        daddr: btf.offset_u16("sock", "__sk_common.skc_daddr")?,
        saddr_v6: btf.offset_u16("sock", "__sk_common.skc_v6_rcv_saddr")?,
        daddr_v6: btf.offset_u16("sock", "__sk_common.skc_v6_daddr")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_btf_is_refused_naming_the_option() {
        let Err(error) = KernelBtf::from_file(Path::new("/nonexistent/vmlinux")) else {
            panic!("a missing BTF file must be an error");
        };
        let message = error.to_string();
        assert!(message.contains("CONFIG_DEBUG_INFO_BTF=y"), "{message}");
        assert!(!message.contains('\n'), "one sentence: {message}");
    }

    /// Reads this machine's kernel BTF: the offsets must be where `struct sock` and `struct
    /// net` put them, and a wrong path must be an error naming it.
    #[test]
    fn resolves_socket_namespace_offsets_from_running_kernel() {
        let btf = match KernelBtf::load() {
            Ok(btf) => btf,
            Err(error) => panic!("this test needs the kernel's BTF: {error}"),
        };
        let offsets = NetnsOffsets::resolve(&btf).expect("netns offsets");
        // skc_net follows the 4-tuple, family, state, flags and hash fields in sock_common.
        assert!(offsets.sk_net >= 40 && offsets.sk_net < 136, "{offsets:?}");
        assert_eq!(offsets.sk_net % 8, 0, "a pointer is 8-aligned: {offsets:?}");
        assert_eq!(btf.offset_of("sock_common", "skc_family").unwrap(), 16);
        let sock = sock_offsets(&btf).expect("the standby's offsets");
        assert_eq!(sock.family, 16, "skc_family follows the addresses and hashes");
        assert!(sock.sport > sock.family, "inet_sport lies in inet_sock, after struct sock");
        // 4 parameters before Linux 6.10, 2 since (flags, err and kern moved into a struct).
        let accept_parameters = btf.parameter_count("inet_csk_accept").unwrap();
        assert!([2, 4].contains(&accept_parameters), "{accept_parameters}");
        assert!(btf.parameter_count("no_such_function_in_any_kernel").is_err());
        // (sk, skb) on older kernels, (sk, skb, err) on newer ones.
        let retransmit_arguments = btf.tracepoint_argument_count("tcp_retransmit_skb").unwrap();
        assert!([2, 3].contains(&retransmit_arguments), "{retransmit_arguments}");
        assert_eq!(btf.tracepoint_argument_count("inet_sock_set_state").unwrap(), 3);
        assert!(btf.tracepoint_argument_count("no_such_tracepoint").is_err());
        // skc_num follows skc_dport in the port pair, after the hashes and addresses.
        let request_port = request_port_offset(&btf).unwrap();
        assert_eq!(request_port, btf.offset_u16("sock", "__sk_common.skc_num").unwrap());
        assert_eq!(sock.state, 18, "skc_state follows skc_family");
        let error = btf.offset_of("sock", "__sk_common.no_such_member").unwrap_err();
        assert!(error.to_string().contains("no_such_member"), "{error}");
    }
}
