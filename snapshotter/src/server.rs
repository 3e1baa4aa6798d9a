//! Serving the snapshots service on a unix socket, and [`run`], the whole
//! daemon (what `skiff snapshotter` calls).

use std::fs;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use skiff_registry::RegistryConfig;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::cri::ImageServiceProxy;
use crate::daemon::Daemons;
use crate::keychain::Keychain;
use crate::resolver::RegistryResolver;
use crate::service::SnapshotsService;
use crate::{Config, Error, Snapshotter};

/// Binds `address`: creates its directory (0711), removes a stale socket
/// (refusing when another server answers on it), makes it 0600.
pub fn bind(address: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = address.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
                .map_err(|e| Error::io(dir, e))?;
        }
    }
    match fs::symlink_metadata(address) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(address).is_ok() {
                return Err(Error::Server(format!(
                    "{} is in use by another server",
                    address.display()
                )));
            }
            fs::remove_file(address).map_err(|e| Error::io(address, e))?;
        }
        Ok(_) => {
            return Err(Error::Server(format!(
                "{} exists and is not a socket",
                address.display()
            )))
        }
        Err(_) => {}
    }
    // Bound 0600 in a private directory and renamed into place: a bind
    // then chmod would let anyone connect in between (umask permitting).
    let std_listener = bind_private(address).map_err(|e| Error::io(address, e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| Error::io(address, e))?;
    UnixListener::from_std(std_listener).map_err(|e| Error::io(address, e))
}

/// Binds a unix socket at `address` with mode 0600: inside a fresh 0700
/// directory beside it, then renamed into place (as the mount daemons'
/// metrics sockets are).
fn bind_private(address: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt as _;
    let private = address.with_file_name(format!(".s{}", std::process::id()));
    let _ = fs::remove_dir_all(&private);
    fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let result = std::os::unix::net::UnixListener::bind(&tmp).and_then(|listener| {
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp, address)?;
        Ok(listener)
    });
    let _ = fs::remove_dir_all(&private);
    match result {
        Err(e) if e.raw_os_error() == Some(libc_einval()) => {
            // The private path is too long for a socket address: bind in
            // place and restrict it at once.
            let listener = std::os::unix::net::UnixListener::bind(address)?;
            fs::set_permissions(address, fs::Permissions::from_mode(0o600))?;
            Ok(listener)
        }
        other => other,
    }
}

/// EINVAL, what `bind` answers for a path too long for `sun_path`.
fn libc_einval() -> i32 {
    nix::errno::Errno::EINVAL as i32
}

/// Serves `sn` on `listener` until `shutdown` completes; with `images`,
/// CRI's image service too.
pub async fn serve(
    sn: Arc<Snapshotter>,
    images: Option<ImageServiceProxy>,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), Error> {
    tonic::transport::Server::builder()
        .add_service(SnapshotsService::new(sn).into_server())
        .add_optional_service(images.map(ImageServiceProxy::into_server))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| Error::Server(e.to_string()))
}

/// SIGINT or SIGTERM.
pub(crate) async fn signalled() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The registry configuration: the `[registry]` table of the snapshotter's
/// configuration, written to `ROOT/registry.toml` for the mount daemons; or,
/// without one, Skiff's default (`SKIFF_REGISTRY_CONFIG`, the Docker config).
pub(crate) fn registry_config(config: &Config) -> Result<(RegistryConfig, Option<PathBuf>), Error> {
    let Some(table) = &config.registry else {
        let rc = RegistryConfig::from_env().map_err(|e| Error::Config(e.to_string()))?;
        return Ok((rc, None));
    };
    let rc: RegistryConfig = table
        .clone()
        .try_into()
        .map_err(|e| Error::Config(format!("[registry]: {e}")))?;
    let text = toml::to_string(table).map_err(|e| Error::Config(format!("[registry]: {e}")))?;
    let path = config.root.join("registry.toml");
    let tmp = config.root.join("registry.toml.tmp");
    fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok((rc, Some(path)))
}

/// What the mount daemons a server starts need from its process: the
/// registry configuration (also pointed at by `SKIFF_REGISTRY_CONFIG` and
/// `SKIFF_HOSTS_DIR`, which the daemons inherit; containerd's hosts.toml
/// files serve the resolver too) and the `skiff` binary to start them
/// with. Call it while the process is single-threaded: it sets variables
/// of its environment.
pub(crate) fn daemon_environment(config: &Config) -> Result<(RegistryConfig, PathBuf), Error> {
    let (mut registry, registry_file) = registry_config(config)?;
    if let Some(file) = registry_file {
        std::env::set_var(skiff_registry::config::ENV_CONFIG, file);
    }
    registry.hosts_dir = config.hosts_dir();
    std::env::set_var(
        skiff_registry::config::ENV_HOSTS_DIR,
        &config.registry_config_path,
    );
    let skiff_bin = match &config.skiff_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::Config(format!("cannot find the running executable: {e}")))?,
    };
    Ok((registry, skiff_bin))
}

/// Runs the snapshotter until SIGINT or SIGTERM: opens the root (bringing
/// image mounts back), binds the socket and serves. Image mounts are left
/// running on exit, for the containers that use them.
///
/// Call it before any other thread runs: it points `SKIFF_REGISTRY_CONFIG`
/// at the registry configuration for the mount daemons it starts.
pub fn run(config: Config) -> Result<(), Error> {
    config.validate()?;
    fs::create_dir_all(&config.root).map_err(|e| Error::io(&config.root, e))?;
    fs::set_permissions(&config.root, fs::Permissions::from_mode(0o711))
        .map_err(|e| Error::io(&config.root, e))?;
    let (registry, skiff_bin) = daemon_environment(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .thread_name("skiff-snapshotter")
        .build()
        .map_err(|e| Error::Internal(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move {
        let mut daemons = Daemons::new(config.root.join("mounts"), skiff_bin, config.mount.clone());
        let mut resolver = RegistryResolver::new(registry);
        let mut images = None;
        if config.cri.image_service {
            let keychain = Arc::new(Keychain::new());
            daemons = daemons.with_keychain(keychain.clone());
            resolver = resolver.with_keychain(keychain.clone());
            images = Some(ImageServiceProxy::new(
                &config.cri.containerd_address,
                keychain,
            )?);
        }
        let sn = Snapshotter::open(&config.root, daemons, Arc::new(resolver)).await?;
        let listener = bind(&config.address)?;
        tracing::info!(
            address = %config.address.display(),
            root = %config.root.display(),
            "skiff snapshotter serving"
        );
        eprintln!(
            "skiff: snapshotter serving on {} (root {}){}",
            config.address.display(),
            config.root.display(),
            if images.is_some() {
                format!(
                    "; CRI image service forwarded to {}",
                    config.cri.containerd_address.display()
                )
            } else {
                String::new()
            }
        );
        serve(sn, images, listener, signalled()).await?;
        let _ = fs::remove_file(&config.address);
        tracing::info!("skiff snapshotter stopped (image mounts keep running)");
        Ok(())
    })
}
