//! `protoc`'s command line, as prost-build calls it, over protox (a protobuf compiler in
//! Rust). Dependencies that compile their protos with prost-build (etcd-client) find this
//! through `PROTOC` (set in `.cargo/config.toml` to `scripts/protoc`), so that building skv
//! needs nothing but Rust. See docs/adr/0011-no-protoc-to-build.md.
//!
//! Supported: `-I DIR`/`-IDIR`/`--proto_path=DIR`, `-o FILE`/`-oFILE`/`--descriptor_set_out=FILE`,
//! `--include_imports`, `--include_source_info`, `--experimental_allow_proto3_optional`
//! (proto3 `optional` is always allowed by protox), `--version`, and the files to compile.
//! Anything else is refused, so a caller never gets less than it asked for.
use prost::Message;
use std::process::ExitCode;

#[derive(Debug, Default, PartialEq)]
struct Args {
    includes: Vec<String>,
    out: Option<String>,
    include_imports: bool,
    include_source_info: bool,
    files: Vec<String>,
    version: bool,
}

fn parse(argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| it.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--version" => a.version = true,
            "--include_imports" => a.include_imports = true,
            "--include_source_info" => a.include_source_info = true,
            "--experimental_allow_proto3_optional" => {}
            "-I" | "--proto_path" => a.includes.push(value(&arg)?),
            "-o" | "--descriptor_set_out" => a.out = Some(value(&arg)?),
            s if s.starts_with("--proto_path=") => a.includes.push(s["--proto_path=".len()..].into()),
            s if s.starts_with("--descriptor_set_out=") => a.out = Some(s["--descriptor_set_out=".len()..].into()),
            s if s.starts_with("-I") => a.includes.push(s[2..].into()),
            s if s.starts_with("-o") => a.out = Some(s[2..].into()),
            s if s.starts_with('-') => return Err(format!("unsupported option {s}")),
            _ => a.files.push(arg),
        }
    }
    Ok(a)
}

fn run(a: Args) -> Result<(), String> {
    if a.version {
        // prost-build and tonic-build only need a version line that parses.
        println!("libprotoc 29.0 (protox)");
        return Ok(());
    }
    let out = a
        .out
        .ok_or("missing -o/--descriptor_set_out (only descriptor sets are produced)")?;
    if a.files.is_empty() {
        return Err("no input files".into());
    }
    let includes = if a.includes.is_empty() {
        vec![".".to_string()]
    } else {
        a.includes
    };
    let mut compiler = protox::Compiler::new(includes).map_err(|e| e.to_string())?;
    compiler
        .include_imports(a.include_imports)
        .include_source_info(a.include_source_info);
    compiler.open_files(&a.files).map_err(|e| format!("{e:?}"))?;
    let bytes = compiler.file_descriptor_set().encode_to_vec();
    std::fs::write(&out, bytes).map_err(|e| format!("writing {out}: {e}"))
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)).and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("protoc (skv-protoc over protox): {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<Args, String> {
        parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_what_prost_build_sends() {
        let a = args("--include_imports --include_source_info -o /tmp/x -I proto -Iother a.proto b.proto").unwrap();
        assert_eq!(
            a,
            Args {
                includes: vec!["proto".into(), "other".into()],
                out: Some("/tmp/x".into()),
                include_imports: true,
                include_source_info: true,
                files: vec!["a.proto".into(), "b.proto".into()],
                version: false,
            }
        );
        let b = args("--proto_path=p --descriptor_set_out=o f.proto").unwrap();
        assert_eq!((b.includes, b.out), (vec!["p".to_string()], Some("o".to_string())));
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        assert!(args("--cpp_out=x a.proto").is_err());
        assert!(args("-I").is_err());
        assert!(run(args("a.proto").unwrap()).is_err(), "no -o");
    }

    #[test]
    fn compiles_a_file_with_imports() {
        let dir = std::env::temp_dir().join(format!("skv-protoc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("a.proto"),
            "syntax = \"proto3\"; package t; import \"google/protobuf/timestamp.proto\"; \
             message A { optional google.protobuf.Timestamp at = 1; }",
        )
        .unwrap();
        let out = dir.join("set.bin");
        let a = Args {
            includes: vec![dir.to_string_lossy().into()],
            out: Some(out.to_string_lossy().into()),
            include_imports: true,
            files: vec!["a.proto".into()],
            ..Args::default()
        };
        run(a).unwrap();
        let set = prost_types_len(&std::fs::read(&out).unwrap());
        assert_eq!(set, 2, "a.proto and its import");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Number of files in an encoded FileDescriptorSet (field 1, repeated).
    fn prost_types_len(buf: &[u8]) -> usize {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Set {
            #[prost(bytes = "vec", repeated, tag = "1")]
            file: Vec<Vec<u8>>,
        }
        Set::decode(buf).unwrap().file.len()
    }
}
