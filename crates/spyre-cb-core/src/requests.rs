//! The request table both policies share: the arena, the id map, the
//! waiting queue, the running list, what the last step produced and what
//! leaves at the next one, and the aborts that arrived mid-step.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::request::Request;

/// Index of a request in the arena.
pub(crate) type Handle = u32;

/// A request as the observation accessors show it: its id and the caller's
/// numeric tag (simulations tag each request with its index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRef<'a> {
    pub id: &'a str,
    pub tag: u32,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct RequestTable {
    /// Indexed by handle (`None`: a free handle).
    arena: Vec<Option<Request>>,
    free_handles: Vec<Handle>,
    ids: HashMap<Arc<str>, Handle>,
    /// FIFO; nobody overtakes.
    pub waiting: VecDeque<Handle>,
    /// Running requests in observation order (the policy keeps it).
    pub running: Vec<Handle>,
    /// Sequences sampling in the pending step, plan order; after `update`,
    /// those that produced a token.
    pub outputs: Vec<Handle>,
    /// Requests that finished in the last step.
    pub finished: Vec<Handle>,
    /// Requests that finished or were aborted while running: their ids stay
    /// taken until the next step forgets them.
    pub gone: Vec<Handle>,
    /// Aborts asked for while a step was in flight, applied when it closes.
    pub queued_aborts: Vec<Handle>,
    /// Requests aborted between steps (gone at once), reported by the
    /// outcome of the next step that closes.
    pub unreported: Vec<Arc<str>>,
    /// Beam searches known (none: `update` never looks for beams).
    pub n_beam_searches: u32,
}

impl RequestTable {
    #[inline]
    pub fn get(&self, h: Handle) -> &Request {
        self.arena[h as usize].as_ref().expect("live handle")
    }
    #[inline]
    pub fn get_mut(&mut self, h: Handle) -> &mut Request {
        self.arena[h as usize].as_mut().expect("live handle")
    }
    pub fn handle(&self, request_id: &str) -> Option<Handle> {
        self.ids.get(request_id).copied()
    }
    pub fn is_live(&self, h: Handle) -> bool {
        self.arena.get(h as usize).is_some_and(Option::is_some)
    }
    /// `Some(finishing)` when the id is taken (`finishing`: by a request that
    /// ended in the last step).
    pub fn id_in_use(&self, request_id: &str) -> Option<bool> {
        self.ids.get(request_id).map(|h| self.gone.contains(h))
    }
    /// A request that may still be aborted (known and not gone).
    pub fn abortable(&self, request_id: &str) -> Option<Handle> {
        self.handle(request_id).filter(|h| !self.gone.contains(h))
    }

    /// Adds a request at the back of the waiting queue.
    pub fn insert(&mut self, req: Request) -> Handle {
        let id = req.id.clone();
        self.n_beam_searches += u32::from(req.beam_width > 1);
        let h = self.place(req);
        self.ids.insert(id, h);
        self.waiting.push_back(h);
        h
    }

    fn place(&mut self, req: Request) -> Handle {
        match self.free_handles.pop() {
            Some(h) => {
                self.arena[h as usize] = Some(req);
                h
            }
            None => {
                self.arena.push(Some(req));
                (self.arena.len() - 1) as Handle
            }
        }
    }

    /// Adds a beam the core made (under its request's id, which maps to the
    /// request; neither queued nor running yet).
    pub fn insert_member(&mut self, req: Request) -> Handle {
        debug_assert!(req.member_of.is_some());
        self.place(req)
    }

    /// Forgets a request (its id becomes free; a beam's stays its request's).
    pub fn remove(&mut self, h: Handle) -> Request {
        let r = self.arena[h as usize].take().expect("live handle");
        if r.member_of.is_none() {
            self.ids.remove(&r.id);
            self.n_beam_searches -= u32::from(r.beam_width > 1);
        }
        self.free_handles.push(h);
        r
    }

    /// The request a sequence belongs to (itself, unless it is a beam the core made).
    #[inline]
    pub fn group_of(&self, h: Handle) -> Handle {
        self.get(h).member_of.unwrap_or(h)
    }

    /// Takes `h` out of the waiting queue if it is there.
    pub fn take_waiting(&mut self, h: Handle) -> bool {
        match self.waiting.iter().position(|&w| w == h) {
            Some(pos) => {
                self.waiting.remove(pos);
                true
            }
            None => false,
        }
    }

    pub fn view(&self, h: Handle) -> RequestRef<'_> {
        let r = self.get(h);
        RequestRef { id: &r.id, tag: r.tag }
    }
    pub fn names(&self, hs: &[Handle]) -> Vec<String> {
        hs.iter().map(|&h| self.get(h).id.to_string()).collect()
    }
}
