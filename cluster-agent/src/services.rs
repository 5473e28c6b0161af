//! Services on the agent's own tunnel address: a table from TCP port to a
//! handler that takes the accepted connection as a plain tokio stream.
//! Adding one is one `insert`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

/// A connection accepted inside the tunnel.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

pub type BoxConn = Box<dyn Conn>;
type Handler = Arc<dyn Fn(BoxConn) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

#[derive(Default, Clone)]
pub struct Services(HashMap<u16, Handler>);

impl Services {
    pub fn insert<F, Fut>(&mut self, port: u16, handler: F)
    where
        F: Fn(BoxConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.0.insert(port, Arc::new(move |c| Box::pin(handler(c))));
    }

    pub fn has(&self, port: u16) -> bool {
        self.0.contains_key(&port)
    }

    /// Runs the handler for `port` on `conn`; false when nothing serves it.
    pub fn spawn(&self, port: u16, conn: BoxConn) -> bool {
        let Some(h) = self.0.get(&port) else {
            return false;
        };
        tokio::spawn(h(conn));
        true
    }
}
